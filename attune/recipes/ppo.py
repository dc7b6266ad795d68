"""RL from feedback with Proximal Policy Optimization, as in InstructGPT: the policy answers
prompts, a reward source scores the answers, and PPO improves the policy against a value model
while a per-token KL penalty keeps it near the frozen reference.

Registered as ``ppo_full_finetune_single_device`` and ``ppo_lora_finetune_single_device`` (and
their ``_distributed`` twins, for torchrun): a ``lora`` section puts adapters on the policy (its
reference is then the policy with them off); the value model trains in full. The ``reward`` component is a reward-model checkpoint
(``attune.rl.ModelReward``) or a Python function (``attune.rl.FunctionReward``). One step of the
loop is one rollout batch: generate (KV cache, no gradients), score, compute advantages, then
``ppo.epochs`` passes of ``batch_size / ppo.minibatch_size`` optimizer steps over it.

    tune run ppo_full_finetune_single_device --config tiny/ppo
    tune run ppo_full_finetune_single_device --config tiny/ppo_reward_model
    tune run --nproc_per_node 2 ppo_full_finetune_distributed --config tiny/ppo
"""

import contextlib
import functools

import torch

from attune import config, evaluation, peft, rl, training
from attune.distributed import all_ranks_sums
from attune.errors import ConfigError

SCHEMA = {
    **training.TRAINING_KEYS,
    **evaluation.EVAL_KEYS,
    "value_model": config.Component(provided=("dtype", "device")),
    "reward": config.Component(expects=rl.REWARD_SOURCE),
    "ppo": config.Component(required=False),
    **training.SAMPLING_KEYS,
    "max_new_tokens": config.Field(int, minimum=1),
    "offload_frozen_models": config.Field(bool, required=False),
}


@training.recipe(SCHEMA)
def recipe_main(cfg, run):
    # Settings and the lm-eval tasks to score as it trains first (a bad one ends the run before
    # any work), then the policy (with its adapters), the value model, the frozen reference and
    # the reward source
    settings = config.instantiate(cfg.get("ppo")) or rl.PPOSettings()
    harness = evaluation.EvalDuringTraining(cfg, run)
    minibatches = settings.minibatches(cfg.batch_size * cfg.get("gradient_accumulation_steps", 1))
    distributed = run.world.distributed
    reward = config.instantiate(cfg.reward)
    setup = training.setup_training(cfg, run)
    policy, tokenizer, lora = setup.model, setup.tokenizer, setup.lora
    saved_value = setup.resume_from / "value" if setup.resume_from else None
    value = training.build_model(cfg.value_model, run, weights=saved_value)
    if value.config.num_labels != 1:
        raise ConfigError(
            "the value model has one output: give value_model num_labels: 1 (or a reward "
            "model's checkpoint)"
        )
    reference, adapters_off = training.reference_model(cfg, run, policy, lora)
    offload = cfg.get("offload_frozen_models", False)
    frozen = training.FrozenModels(reference, adapters_off, reward, run, offload)

    # Prompts, and the loop (one optimizer over the policy and the value model)
    pad_id = tokenizer.padding_id
    dataset = config.instantiate(cfg.dataset, tokenizer=tokenizer)
    run.print(f"{len(dataset)} prompts; {dataset.stats.summary(dataset.max_seq_len)}")
    stream = training.BatchStream.from_config(cfg, dataset, pad_id, run.world)
    loop = training.training_loop(
        cfg, run, setup, stream, companions={"value": value},
        updates_per_step=settings.epochs * minibatches,
    )  # fmt: skip
    kl_control = rl.KLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
    kl_limit = rl.KLLimit(settings.kl_limit)
    if loop.resumed:
        kl_control.load_state_dict(loop.recipe_state)
    answers = training.AnswerLog.at_start(cfg, tokenizer, run, policy, loop.resumed)
    seed = cfg.get("seed", 0)
    # the log-probabilities (ratios, KL) are taken at the temperature the rollouts were sampled
    # at, as TRL's PPO does: the distribution that produced them
    sampling = training.sampling_options(cfg, temperature=1.0)
    temperature = sampling["temperature"] or 1.0  # greedy rollouts: the model's own distribution

    # The loop: one rollout batch per item
    for micro_batches in loop:
        # 1. Rollouts: each step's sampling seeded by the step (and the process), so a resumed
        # run samples alike; processes decode their own prompts in step
        prompts = [prompt for batch in micro_batches for prompt in batch["prompts"]]
        texts = [text for batch in micro_batches for text in batch["texts"]]
        columns = [row for batch in micro_batches for row in batch["columns"]]
        generator = torch.Generator(run.device).manual_seed(
            seed * 1_000_003 + loop.step + 1_000_000_007 * run.world.rank
        )
        rollout = rl.generate_rollout(
            policy,
            prompts,
            cfg.max_new_tokens,
            **sampling,
            stop_tokens=tokenizer.stop_token_ids,
            pad_id=pad_id,
            generator=generator,
            all_ranks=distributed,
        )
        mask = rollout.response_mask

        # 2. Scores, per-token rewards, advantages (no gradients)
        with torch.no_grad():
            hidden = rl.response_hidden(policy, rollout, run.precision)
            with frozen.reference(policy) as model:
                adapters = (
                    peft.disabled_adapters(model) if adapters_off else contextlib.nullcontext()
                )
                with adapters:
                    ref_hidden = rl.response_hidden(model, rollout, run.precision)
                head = frozen.head_of(model)
                # the policy's and reference's heads projected once for all four
                scored = rl.score_rollout(
                    hidden, ref_hidden, rollout, rl.tempered(policy.output, temperature),
                    rl.tempered(head, temperature),
                )  # fmt: skip
            old_logprobs, ref_logprobs = scored.logprobs, scored.reference_logprobs
            entropy, kl_vocab = scored.entropy, scored.kl_vocab
            old_values = rl.response_values(value, rollout, run.precision)
            completions = tokenizer.decode_batch(rollout.response_ids(), skip_special_tokens=True)
            with frozen.reward() as score:
                scores = score(rollout, texts, completions, columns, run.precision)
            if settings.no_stop_penalty is not None:
                scores = scores - settings.no_stop_penalty * (~rollout.stopped).float()
            kl = rl.kl_penalty(old_logprobs, ref_logprobs, settings.kl_estimator) * mask
            rewards = rl.token_rewards(scores, kl, mask, kl_control.value)
            advantages, returns = rl.gae(rewards, old_values, mask, settings.gamma, settings.lam)
            if settings.whiten_advantages:
                advantages = rl.whiten(advantages, mask, all_ranks=distributed)
        experience = {
            "tokens": rollout.tokens,
            "padding_mask": rollout.padding_mask,
            "response_mask": mask,
            "old_logprobs": old_logprobs,
            "old_values": old_values,
            "advantages": advantages,
            "returns": returns,
        }
        if kl_limit.limit is not None:  # the updates measure the policy against it
            experience["ref_hidden"] = ref_hidden

        # 3. PPO epochs over minibatches: one optimizer step each, token-exact (with a KL
        # limit the reference's head is at hand: updates past it move back)
        order_source = torch.Generator().manual_seed(seed * 1_000_003 + loop.step)
        updates, update_sums, grad_norm = 0, {}, None
        limited = frozen.reference_head(policy) if kl_limit.limit else contextlib.nullcontext()
        with limited as reference_output:
            loss_of = functools.partial(
                ppo_loss, policy=policy, value=value, settings=settings, kl_limit=kl_limit,
                reference_output=reference_output, prompt_len=rollout.prompt_len,
                precision=run.precision, temperature=temperature,
            )  # fmt: skip
            for rows in rl.minibatch_rows(len(prompts), settings.epochs, minibatches, order_source):
                minibatch = {
                    name: tensor[rows.to(tensor.device)] for name, tensor in experience.items()
                }
                tokens, _, sums = training.accumulated_backward(
                    policy,
                    [minibatch],
                    lambda batch: int(batch["response_mask"].sum()),
                    loss_of,
                    run.device,
                )
                grad_norm = loop.optimizer_step(cfg.get("clip_grad_norm"))
                updates += tokens
                for name, total in sums.items():
                    update_sums[name] = update_sums.get(name, 0.0) + total
        update_means = {name: total / max(updates, 1) for name, total in update_sums.items()}
        training.check_finite(update_means["loss"], loop.step, loop.last_saved)

        # 4. The batch's statistics over every process; the KL coefficient for the next batch
        local = {
            "rollouts": len(prompts), "score": scores.sum(), "score_squares": (scores**2).sum(),
            "kl": kl.sum(), "kl_vocab": kl_vocab.sum(), "entropy": (entropy * mask).sum(),
            "response_tokens": mask.sum(), "stopped": rollout.stopped.sum(),
            "input_tokens": rollout.padding_mask.sum(),
        }  # fmt: skip
        total = dict(zip(local, all_ranks_sums(
            [float(value) for value in local.values()]), strict=True))  # fmt: skip
        rollouts = total["rollouts"]
        per_response_kl = total["kl"] / rollouts
        kl_control.update(per_response_kl, int(rollouts))
        loop.recipe_state = kl_control.state_dict()
        loop.count(int(total["input_tokens"]))
        loop.log(
            {
                **update_means,
                **training.mean_and_std("reward", total["score"], total["score_squares"], rollouts),
                "kl": per_response_kl,
                "kl_vocab": total["kl_vocab"] / rollouts,
                "kl_coef": kl_control.value,
                "entropy": total["entropy"] / max(total["response_tokens"], 1),
                "response_length": total["response_tokens"] / rollouts,
                "stop_fraction": total["stopped"] / rollouts,
                "grad_norm": grad_norm,
            }
        )
        harness.at_step(loop, policy, tokenizer)
        loop.end_step()
    loop.finish()
    answers.record(policy, "after")


def ppo_loss(
    batch, *, policy, value, settings, kl_limit, reference_output, prompt_len, precision,
    temperature,
):  # fmt: skip
    """A minibatch of experience -> PPO's summed loss (clipped policy loss plus the weighted
    clipped value loss, over its response tokens) and its summed statistics. Past the KL
    limit, the policy's loss is its KL to the reference instead (:class:`attune.rl.KLLimit`)."""
    sample = rl.Rollout(
        batch["tokens"], batch["padding_mask"], prompt_len, batch["response_mask"],
        batch["response_mask"].any(-1),
    )  # fmt: skip
    tokens = batch["response_mask"]
    hidden = rl.response_hidden(policy, sample, precision)
    logprobs = rl.response_logprobs(policy, sample, hidden=hidden, temperature=temperature)
    policy_loss, policy_stats = rl.clipped_policy_loss(
        logprobs, batch["old_logprobs"], batch["advantages"], tokens, settings.clip_ratio
    )
    restoring = False
    if kl_limit.limit is not None:
        kl = rl.response_kl(
            hidden, batch["ref_hidden"], sample, rl.tempered(policy.output, temperature),
            rl.tempered(reference_output, temperature),
        )  # fmt: skip
        kl_sum, rows = all_ranks_sums([float(kl.detach().sum()), len(kl)])
        restoring = kl_limit.restores(kl_sum / rows)
        if restoring:
            policy_loss = kl.sum()
    values = rl.response_values(value, sample, precision)
    value_loss, value_stats = rl.clipped_value_loss(
        values, batch["old_values"], batch["returns"], tokens, settings.value_clip
    )
    loss = policy_loss + settings.value_coef * value_loss
    stats = {"loss": loss.detach(), "policy_loss": policy_loss.detach(),
             "value_loss": value_loss.detach(), **policy_stats, **value_stats,
             "kl_restoring": tokens.sum() * float(restoring)}  # fmt: skip
    return loss, stats


if __name__ == "__main__":
    recipe_main()
