"""TRL's ``GRPOTrainer`` for the GRPO side-by-side benchmark (:mod:`benchmarks.grpo_side_by_side`).

One run on the CPU in fp32, no vLLM, no gradient checkpointing: ``--prompts`` prompts per step,
each answered ``--num-generations`` times (one generation batch of prompts x generations
completions, one optimizer step on it: ``per_device_train_batch_size`` = that batch,
``steps_per_generation`` = ``num_iterations`` = 1), up to ``--max-completion-length`` tokens
sampled at temperature 1 (no top-k, top-p or min-p), the ``dapo`` loss with
``epsilon = 0.2``, ``beta = 0``, rewards scaled by the group's standard deviation, AdamW without
weight decay at a constant learning rate, gradients clipped to norm 1, the demo's reversal
reward (:func:`attune.demo.reverse_words_reward`) on the assistant's text.

Writes ``--out`` (JSON lines), one line per optimizer step: ``step``, ``end`` (the clock,
``time.perf_counter``, when the step ended), ``generation_s`` (the seconds spent in the
trainer's ``_generate``: tokenizing the prompts, ``model.generate``, decoding), ``completions``
and ``completion_tokens`` (every completion's tokens, its EOS included, as TRL counts them for
``completions/mean_length``), ``loss`` and ``reward``.

    python benchmarks/trl_grpo.py --model MODEL_DIR --data prompts.jsonl --steps 10 --out steps.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def reverse_words(
    prompts: list[Any], completions: list[Any], output: list[str], **kwargs: Any
) -> list[float]:
    """The demo's reward on conversational completions (TRL hands ``[{"role", "content"}]``
    lists; the reward reads text)."""
    from attune.demo import reverse_words_reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return reverse_words_reward(prompts, texts, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an HF model folder")
    parser.add_argument("--data", type=Path, required=True, help="JSON lines: prompt, output")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", type=Path, default=None, help="the trainer's output_dir")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(args.data), split="train")
    completions = args.prompts * args.num_generations
    config = GRPOConfig(
        output_dir=str(args.scratch or args.out.parent / "trl_out"),
        max_steps=args.steps,
        per_device_train_batch_size=completions,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        loss_type="dapo",
        epsilon=0.2,
        beta=0.0,
        num_iterations=1,
        scale_rewards="group",
        mask_truncated_completions=False,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        use_vllm=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
        log_completions=False,
    )

    steps: list[dict[str, Any]] = []
    pending = {"generation_s": 0.0, "completions": 0, "completion_tokens": 0}

    class StepTimer(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            steps.append({"step": state.global_step, "end": time.perf_counter(), **pending})
            pending.update(generation_s=0.0, completions=0, completion_tokens=0)

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and steps and steps[-1]["step"] == state.global_step:
                for key in ("loss", "reward"):
                    if key in logs:
                        steps[-1][key] = float(logs[key])

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reverse_words],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    generate = trainer._generate

    def timed_generate(prompts):
        started = time.perf_counter()
        result = generate(prompts)
        pending["generation_s"] += time.perf_counter() - started
        completion_ids = result[1]
        pending["completions"] += len(completion_ids)
        pending["completion_tokens"] += sum(len(ids) for ids in completion_ids)
        return result

    trainer._generate = timed_generate  # type: ignore[method-assign]
    started = time.perf_counter()
    trainer.train()
    print(f"TRL train() took {time.perf_counter() - started:.1f}s", flush=True)
    args.out.write_text("".join(json.dumps(step) + "\n" for step in steps))


if __name__ == "__main__":
    main()
