"""Generation: prompts or chat messages in, the model's answers out.

Each prompt is rendered with the model's chat template (``chat: false`` encodes it as plain
text), answered with the KV cache (greedy at ``temperature: 0``), and printed. ``adapter``
applies a peft LoRA adapter folder (one a LoRA run wrote) to the base model first;
``output_file`` also writes each prompt, answer and answer's token ids as a JSON line.

    tune run generate --config tiny/generate
    tune run generate --config tiny/generate adapter=/tmp/attune/tiny_lora/checkpoints/step_1000
"""

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from attune import config, models, training
from attune.errors import ConfigError

SCHEMA = {
    **training.MODEL_KEYS,
    "adapter": config.Field(str | None, required=False),
    "prompts": list,
    "system_prompt": config.Field(str | None, required=False),
    "chat": config.Field(bool, required=False),
    **training.SAMPLING_KEYS,
    "batch_size": config.Field(int, required=False, minimum=1),
    "output_file": config.Field(str | None, required=False),
}


def as_messages(prompt, system_prompt):
    """A prompt (text, or a list of ``{"role", "content"}`` messages) as a conversation."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        raise ConfigError(
            f"prompts: {prompt!r} is neither text nor a list of {{role, content}} messages "
            "(quote a prompt that holds ': ')"
        )
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


@config.parse(SCHEMA)
def recipe_main(cfg):
    device = training.resolve_device(cfg.get("device", "auto"))
    dtype = training.resolve_dtype(cfg.get("dtype", "fp32"))
    generator = torch.Generator(device=device).manual_seed(cfg.get("seed", 0))
    tokenizer = config.instantiate(cfg.tokenizer)
    model, _ = training.inference_model(cfg, dtype, device)

    prompts = OmegaConf.to_container(cfg.prompts, resolve=True)
    if cfg.get("chat", True):
        inputs = [
            tokenizer.apply_chat_template(
                as_messages(p, cfg.get("system_prompt")), add_generation_prompt=True, tokenize=True
            )
            for p in prompts
        ]
    else:
        inputs = [tokenizer.encode(p) for p in prompts]
    pad_id = tokenizer.padding_id
    batch_size = cfg.get("batch_size", 8)
    records = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            answers = models.generate(
                model,
                inputs[start : start + batch_size],
                cfg.get("max_new_tokens", 64),
                **training.sampling_options(cfg, temperature=0.0),
                stop_tokens=tokenizer.stop_token_ids,
                pad_id=pad_id,
                generator=generator,
            )
            for prompt, answer in zip(prompts[start : start + batch_size], answers, strict=True):
                text = tokenizer.decode(answer, skip_special_tokens=True)
                shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
                print(f"> {shown}\n{text}\n", flush=True)
                records.append({"prompt": prompt, "answer": text, "tokens": answer})
    if cfg.get("output_file"):
        lines = "".join(json.dumps(record) + "\n" for record in records)
        Path(cfg.output_file).write_text(lines, encoding="utf-8")


if __name__ == "__main__":
    recipe_main()
