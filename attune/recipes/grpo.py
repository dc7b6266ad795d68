"""Online RL with verifiable rewards: Group Relative Policy Optimization and its family (DAPO,
Dr. GRPO, BNPO, GSPO). Each prompt is answered ``grpo.num_generations`` times; a completion's
advantage is its reward against its group's; the policy improves by a clipped objective, with
no value model and, unless ``grpo.beta`` > 0, no reference model either.

Registered as ``grpo_full_finetune_single_device`` and ``grpo_lora_finetune_single_device``
(and their ``_distributed`` twins, for torchrun): a ``lora`` section puts adapters on the
policy. One step of the loop is one generated batch: sample the groups (KV cache, no
gradients; every completion seeded by its prompt, place and step, so any process count
samples alike), score them with the reward functions, compute advantages, then
``grpo.num_iterations`` passes of ``batch / grpo.minibatch_size`` optimizer steps over it.

    tune run grpo_full_finetune_single_device --config tiny/grpo
    tune run grpo_lora_finetune_single_device --config tiny/grpo_lora
    tune run --nproc_per_node 2 grpo_full_finetune_distributed --config tiny/grpo
"""

import contextlib
import functools
import time

import torch

from attune import config, evaluation, peft, rl, training
from attune.distributed import all_ranks_max, all_ranks_sums
from attune.errors import ConfigError

SCHEMA = {
    **training.TRAINING_KEYS,
    **evaluation.EVAL_KEYS,
    "reward": config.Component(expects=rl.REWARD_SOURCE),
    "grpo": config.Component(required=False),
    **training.SAMPLING_KEYS,
    "max_new_tokens": config.Field(int, minimum=1),
    "reference_model": config.Component(required=False, provided=("dtype", "device")),
    "offload_frozen_models": config.Field(bool, required=False),
}


@training.recipe(SCHEMA)
def recipe_main(cfg, run):
    # Settings, rewards and the lm-eval tasks first (a bad one ends the run before any work),
    # then the policy (with its adapters) and, when the KL to it is weighed, the reference
    settings = config.instantiate(cfg.get("grpo")) or rl.GRPOSettings()
    harness = evaluation.EvalDuringTraining(cfg, run)
    groups_per_process = cfg.batch_size * cfg.get("gradient_accumulation_steps", 1)
    completions = groups_per_process * settings.num_generations
    minibatches = settings.minibatches(completions)
    keep_old_logprobs = settings.reuses_old_logprobs(minibatches)
    if settings.beta > 0 and "reference_model" in cfg and cfg.reference_model is None:
        raise ConfigError(
            f"grpo.beta={settings.beta} weighs the KL to a reference, but reference_model is "
            "null; remove that line (the starting model serves) or set grpo.beta=0"
        )
    sampling = training.sampling_options(cfg, 1.0)
    temperature = sampling["temperature"]
    if temperature <= 0:
        raise ConfigError(
            f"temperature={temperature} samples every completion of a group alike (greedy), so "
            "no advantage is ever non-zero; GRPO needs temperature > 0 (1.0 is usual)"
        )
    if settings.overlong_buffer is not None and settings.overlong_buffer > cfg.max_new_tokens:
        raise ConfigError(
            f"grpo.overlong_buffer={settings.overlong_buffer} is longer than max_new_tokens="
            f"{cfg.max_new_tokens}: every completion would be penalised; make it smaller"
        )
    rewards = rl.Rewards.of(config.instantiate(cfg.reward))
    setup = training.setup_training(cfg, run)
    policy, tokenizer, lora = setup.model, setup.tokenizer, setup.lora
    reference, adapters_off = None, False
    if settings.beta > 0:
        if cfg.get("reference_model") is not None:
            reference = training.build_model(cfg.reference_model, run).requires_grad_(False)
        else:
            reference, adapters_off = training.reference_model(cfg, run, policy, lora)
    frozen = training.FrozenModels(
        reference, adapters_off, rewards, run, cfg.get("offload_frozen_models", False)
    )

    # Prompts, and the loop (each step: one generated batch, several optimizer steps)
    pad_id, stop_tokens = tokenizer.padding_id, tokenizer.stop_token_ids
    dataset = config.instantiate(cfg.dataset, tokenizer=tokenizer)
    run.print(f"{len(dataset)} prompts; {dataset.stats.summary(dataset.max_seq_len)}")
    stream = training.BatchStream.from_config(cfg, dataset, pad_id, run.world)
    loop = training.training_loop(
        cfg, run, setup, stream, updates_per_step=settings.num_iterations * minibatches
    )
    answers = training.AnswerLog.at_start(cfg, tokenizer, run, policy, loop.resumed)
    seed, distributed, world = cfg.get("seed", 0), run.world.distributed, run.world

    def score(rollout, texts, columns):
        """The reward sources' scores of a rollout, and the rewards (weighted, penalised)."""
        completions = tokenizer.decode_batch(rollout.response_ids(), skip_special_tokens=True)
        with frozen.reward() as sources:
            scores = sources.scores(rollout, texts, completions, columns, run.precision)
        total = sources.total(scores)
        if settings.overlong_buffer is not None:
            total = total + rl.overlong_penalty(
                rollout.response_lengths, cfg.max_new_tokens, settings.overlong_buffer,
                settings.overlong_penalty,
            )  # fmt: skip
        return scores, total

    sample = functools.partial(
        rl.sample_groups, policy, score=score, num_generations=settings.num_generations,
        max_new_tokens=cfg.max_new_tokens, sampling=sampling,
        stop_tokens=stop_tokens, pad_id=pad_id, seed=seed, rank=world.rank,
        world_size=world.world_size, all_ranks=distributed,
    )  # fmt: skip
    for micro_batches in loop:
        # 1. Groups: with dynamic sampling (DAPO), more prompts until the batch holds enough
        # groups whose rewards differ, or the rounds run out
        started = time.perf_counter()
        groups, rounds, drawn = [], 0, micro_batches
        while drawn is not None and rounds < settings.max_sampling_rounds:
            rounds += 1
            groups += sample(drawn, step=loop.step, round_index=rounds)
            if not settings.dynamic_sampling:
                break
            (varied,) = all_ranks_sums([rl.varied_count(groups)])
            if varied >= groups_per_process * world.world_size:
                break
            if rounds == settings.max_sampling_rounds:  # no round left to use more prompts
                break
            drawn = loop.more_batches()
        sampled_groups = len(groups)
        sampled_tokens = sum(len(response) for group in groups for response in group.responses)
        dropped = filled = 0
        if settings.dynamic_sampling:
            groups, dropped, filled = rl.batch_groups(
                groups, groups_per_process, world.rank, world.world_size
            )
        generation_seconds = time.perf_counter() - started
        batch = rl.GroupBatch.of(groups, stop_tokens, pad_id, run.device)
        rollout = batch.rollout

        # 2. Advantages, and what the updates compare against (no gradients)
        advantages, uniform = rl.group_advantages(
            batch.rewards, settings.num_generations, settings.scale_rewards, distributed
        )
        loss_mask = rollout.response_mask
        if settings.mask_truncated_completions:
            loss_mask = loss_mask & rollout.stopped[:, None]
        experience = {
            "tokens": rollout.tokens,
            "padding_mask": rollout.padding_mask,
            "response_mask": rollout.response_mask,
            "loss_mask": loss_mask,
            "advantages": advantages,
        }
        logprobs_of = functools.partial(
            frozen_logprobs, rollout=rollout, micro_batch_size=settings.micro_batch_size,
            precision=run.precision, temperature=temperature,
        )  # fmt: skip
        with torch.no_grad():
            if keep_old_logprobs:
                experience["old_logprobs"] = logprobs_of(policy)
            if settings.beta > 0:  # a LoRA policy's reference: itself, every adapter off
                with frozen.reference(policy) as model:
                    adapters = (
                        peft.disabled_adapters(model) if adapters_off else contextlib.nullcontext()
                    )
                    with adapters:
                        experience["ref_logprobs"] = logprobs_of(model)

        # 3. num_iterations passes of minibatches: one optimizer step each, token-exact
        order_source = torch.Generator().manual_seed(seed * 1_000_003 + loop.step)
        update_sums, grad_norm = {}, None
        loss_of = functools.partial(
            completions_loss, policy=policy, settings=settings, max_new_tokens=cfg.max_new_tokens,
            prompt_len=rollout.prompt_len, precision=run.precision, temperature=temperature,
        )  # fmt: skip
        rows_of = rl.group_minibatch_rows(
            completions, settings.num_iterations, minibatches, order_source
        )
        for rows in rows_of:
            minibatch = {
                name: tensor[rows.to(tensor.device)] for name, tensor in experience.items()
            }
            units, _, sums = training.accumulated_backward(
                policy,
                split_rows(minibatch, settings.micro_batch_size),
                lambda part: settings.units(part["loss_mask"]),
                loss_of,
                run.device,
            )
            grad_norm = loop.optimizer_step(cfg.get("clip_grad_norm"))
            update_sums["units"] = update_sums.get("units", 0) + units
            for name, total in sums.items():
                update_sums[name] = update_sums.get(name, 0.0) + total
        loss = update_sums["loss"] / max(update_sums["units"], 1)
        training.check_finite(loss, loop.step, loop.last_saved)

        # 4. The batch's statistics over every process
        lengths, response_tokens = rollout.response_lengths.float(), rollout.response_mask.sum()
        local = {
            "completions": len(lengths), "reward": batch.rewards.double().sum(),
            "reward_squares": (batch.rewards.double() ** 2).sum(), "length": lengths.sum(),
            "truncated": (~rollout.stopped).sum(), "uniform_groups": uniform.sum(),
            "input_tokens": rollout.padding_mask.sum(), "generated": response_tokens,
            "sampled_groups": sampled_groups, "sampled_tokens": sampled_tokens,
            **{f"score_{i}": scores.sum() for i, scores in enumerate(batch.scores)},
            **{f"score_squares_{i}": (s.double() ** 2).sum() for i, s in enumerate(batch.scores)},
        }  # fmt: skip
        total = dict(zip(local, all_ranks_sums(
            [float(value) for value in local.values()]), strict=True))  # fmt: skip
        count = total["completions"]
        longest = float(all_ranks_max(lengths.max()))
        tokens = max(update_sums.get("loss_tokens", 0.0), 1.0)
        loop.count(int(total["input_tokens"]))
        loop.log(
            {
                "loss": loss,
                "policy_loss": update_sums["policy_loss"] / max(update_sums["units"], 1),
                **training.mean_and_std("reward", total["reward"], total["reward_squares"], count),
                **{
                    key: value
                    for i, name in enumerate(rewards.names)
                    for key, value in training.mean_and_std(
                        f"rewards/{name}", total[f"score_{i}"], total[f"score_squares_{i}"], count
                    ).items()
                },
                "completion_length": total["length"] / count,
                "completion_length_max": longest,
                "truncated_share": total["truncated"] / count,
                "clip_low": update_sums["clip_low"] / tokens,
                "clip_high": update_sums["clip_high"] / tokens,
                "kl": update_sums["kl"] / tokens if settings.beta > 0 else None,
                "entropy": update_sums["entropy"] / max(update_sums["response_tokens"], 1.0),
                "zero_std_share": total["uniform_groups"] * settings.num_generations / count,
                "dropped_groups": dropped if settings.dynamic_sampling else None,
                "filled_groups": filled if settings.dynamic_sampling else None,
                "sampled_groups": total["sampled_groups"] if settings.dynamic_sampling else None,
                "generated_tokens_per_second": total["sampled_tokens"]
                / max(generation_seconds, 1e-9),
                "router_aux_loss": (  # a mixture of experts' load-balancing loss, per unit
                    update_sums["router_aux_loss"] / max(update_sums["units"], 1)
                    if "router_aux_loss" in update_sums
                    else None
                ),
                "grad_norm": grad_norm,
            }
        )
        harness.at_step(loop, policy, tokenizer)
        loop.end_step()
    loop.finish()
    answers.record(policy, "after")


def split_rows(batch, rows_per_part):
    """A minibatch cut into micro-batches of ``rows_per_part`` rows (None: one)."""
    size = next(iter(batch.values())).shape[0]
    step = rows_per_part or size
    return [{name: t[start : start + step] for name, t in batch.items()}
            for start in range(0, size, step)]  # fmt: skip


def frozen_logprobs(model, *, rollout, micro_batch_size, precision, temperature):
    """``model``'s log-probabilities of the rollout's responses at the sampling temperature, in
    micro-batches of ``micro_batch_size`` completions (the memory bound the updates keep)."""
    rows = rollout.tokens.shape[0]
    step = micro_batch_size or rows
    parts = []
    for start in range(0, rows, step):
        part = rollout.select(slice(start, start + step))
        parts.append(rl.response_logprobs(model, part, precision, temperature=temperature))
    return torch.cat(parts)


def completions_loss(
    batch, *, policy, settings, max_new_tokens, prompt_len, precision, temperature
):
    """A micro-batch of completions -> the GRPO-family loss summed over its units, and its
    summed statistics."""
    sample = rl.Rollout(
        batch["tokens"], batch["padding_mask"], prompt_len, batch["response_mask"],
        batch["response_mask"].any(-1),
    )  # fmt: skip
    hidden = rl.response_hidden(policy, sample, precision)
    logprobs, entropy = rl.response_logprobs_and_entropy(
        hidden, sample, rl.tempered(policy.output, temperature)
    )
    old = batch["old_logprobs"] if "old_logprobs" in batch else logprobs.detach()
    loss, stats = rl.grpo_loss(
        logprobs, old, batch["advantages"], batch["loss_mask"], settings, max_new_tokens,
        batch.get("ref_logprobs"),
    )  # fmt: skip
    response = batch["response_mask"]
    return loss, {
        "loss": loss.detach(),
        **stats,
        "entropy": (entropy * response).sum(),
        "response_tokens": response.sum(),
        "loss_tokens": batch["loss_mask"].sum(),
    }


if __name__ == "__main__":
    recipe_main()
