"""The recipes ``tune`` knows by name, each with its script and its built-in configs.

A ``*_single_device`` recipe and its ``*_distributed`` twin are one script registered twice:
the script runs on one device in-process, or on many under torchrun. Configs are named by
their path under ``configs/`` without the suffix (``tiny/lora``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    """A named recipe.

    Args:
        name: what users type after ``tune run``.
        script: the script's file name in ``attune/recipes/``.
        configs: names of the built-in configs made for it.
    """

    name: str
    script: str
    configs: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return RECIPE_DIR / self.script


# Recipes land here as they are built; a name is listed only once its script works end to end.
MODEL_CONFIGS = (
    "llama3_2/1B",
    "llama3_2/3B",
    "llama3_1/8B",
    "qwen2_5/0.5B",
    "qwen2_5/1.5B",
    "qwen2_5/7B",
    "qwen3/0.6B",
    "mistral/7B",
    "gemma2/2B",
    "phi3/mini",
)

# full DPO holds the policy and a frozen reference: shipped for the small models
FULL_DPO_CONFIGS = ("llama3_2/1B", "qwen2_5/0.5B", "qwen3/0.6B")

RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "full_finetune_single_device",
        "finetune.py",
        ("tiny/full", *(f"{name}_full" for name in MODEL_CONFIGS)),
    ),
    Recipe(
        "lora_finetune_single_device",
        "finetune.py",
        ("tiny/lora", *(f"{name}_lora" for name in MODEL_CONFIGS)),
    ),
    Recipe("full_finetune_distributed", "finetune.py", ("tiny/full",)),
    Recipe("lora_finetune_distributed", "finetune.py", ("tiny/lora",)),
    Recipe(
        "lora_dpo_single_device",
        "dpo.py",
        ("tiny/dpo_lora", *(f"{name}_dpo_lora" for name in MODEL_CONFIGS)),
    ),
    Recipe("lora_dpo_distributed", "dpo.py", ("tiny/dpo_lora",)),
    Recipe("full_dpo_single_device", "dpo.py", ("tiny/dpo_full",)),
    Recipe(
        "full_dpo_distributed",
        "dpo.py",
        ("tiny/dpo_full", *(f"{name}_dpo_full" for name in FULL_DPO_CONFIGS)),
    ),
    Recipe("qat_single_device", "finetune.py", ("tiny/qat",)),
    Recipe("qat_distributed", "finetune.py", ("tiny/qat",)),
    Recipe("qat_lora_finetune_single_device", "finetune.py", ("tiny/qat_lora",)),
    Recipe("qat_lora_finetune_distributed", "finetune.py", ("tiny/qat_lora",)),
    Recipe("reward_model_single_device", "reward_model.py", ("tiny/reward_model",)),
    Recipe("reward_model_distributed", "reward_model.py", ("tiny/reward_model",)),
    Recipe("ppo_full_finetune_single_device", "ppo.py", ("tiny/ppo", "tiny/ppo_reward_model")),
    Recipe("ppo_lora_finetune_single_device", "ppo.py", ("tiny/ppo_lora",)),
    Recipe("ppo_full_finetune_distributed", "ppo.py", ("tiny/ppo", "tiny/ppo_reward_model")),
    Recipe("ppo_lora_finetune_distributed", "ppo.py", ("tiny/ppo_lora",)),
    Recipe(
        "grpo_full_finetune_single_device",
        "grpo.py",
        ("tiny/grpo", "qwen2_5/0.5B_grpo", "qwen2_5/1.5B_grpo", "qwen3/0.6B_grpo"),
    ),
    Recipe("grpo_lora_finetune_single_device", "grpo.py", ("tiny/grpo_lora",)),
    Recipe(
        "grpo_full_finetune_distributed",
        "grpo.py",
        ("tiny/grpo", "qwen2_5/0.5B_grpo", "qwen2_5/1.5B_grpo", "qwen3/0.6B_grpo"),
    ),
    Recipe("grpo_lora_finetune_distributed", "grpo.py", ("tiny/grpo_lora",)),
    Recipe(
        "knowledge_distillation_single_device",
        "knowledge_distillation.py",
        ("tiny/kd", "tiny/kd_lora", "qwen2_5/1.5B_to_0.5B_kd"),
    ),
    Recipe(
        "knowledge_distillation_distributed",
        "knowledge_distillation.py",
        ("tiny/kd", "tiny/kd_lora", "qwen2_5/1.5B_to_0.5B_kd", "llama3_1/8B_to_llama3_2_1B_kd"),
    ),
    Recipe("quantize", "quantize.py", ("tiny/quantize",)),
    Recipe("generate", "generate.py", ("tiny/generate",)),
    Recipe("eleuther_eval", "eleuther_eval.py", ("tiny/eval",)),
)
