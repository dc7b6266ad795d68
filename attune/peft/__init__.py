"""Parameter-efficient fine-tuning: LoRA, DoRA and QLoRA adapters (LoRA on mixture-of-experts
grouped weights too), merged or in peft's format."""

from attune.peft.adapter import load_adapter, read_adapter_settings, save_adapter
from attune.peft.lora import (
    ALL_LINEAR,
    EXPERT_PROJECTIONS,
    LoRAGroupedExperts,
    LoRALinear,
    LoraSettings,
    adapter_state_dict,
    apply_lora,
    disabled_adapters,
    experts_modules,
    is_adapter_key,
    merge_lora,
    merge_state_dict,
    merged_state_dict,
)

__all__ = [
    "ALL_LINEAR",
    "EXPERT_PROJECTIONS",
    "LoRAGroupedExperts",
    "LoRALinear",
    "LoraSettings",
    "adapter_state_dict",
    "apply_lora",
    "disabled_adapters",
    "experts_modules",
    "is_adapter_key",
    "load_adapter",
    "merge_lora",
    "merge_state_dict",
    "merged_state_dict",
    "read_adapter_settings",
    "save_adapter",
]
