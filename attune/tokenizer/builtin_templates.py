"""Chat templates for checkpoints that ship none (base models), selectable by name.

Each renders what the named model family's own template renders for plain conversations
(the tests compare them with the real templates). Where the family has no system role, a
system message is folded into the first user turn, as Gemma 3 and Mistral v0.3 do.
"""

from __future__ import annotations

from pathlib import Path

from attune.suggest import did_you_mean
from attune.tokenizer.chat_template import ChatTemplateError

_FOLD_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- endif -%}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    # Qwen, SmolLM and many others
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{- message['content'] | trim + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif -%}"
    ),
    "llama2": (
        _FOLD_SYSTEM + "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set content = message['content'] -%}"
        "{%- if loop.first and system -%}"
        "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content -%}"
        "{%- endif -%}"
        "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    "mistral": (
        _FOLD_SYSTEM + "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set content = message['content'] -%}"
        "{%- if loop.first and system -%}{%- set content = system + '\\n\\n' + content -%}{%- endif -%}"
        "{{ '[INST] ' + content + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ message['content'] + eos_token + ' ' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    "gemma": (
        _FOLD_SYSTEM + "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{%- set content = message['content'] | trim -%}"
        "{%- if loop.first and system -%}{%- set content = system + '\\n\\n' + content -%}{%- endif -%}"
        "{{ '<start_of_turn>' + role + '\\n' + content + '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    ),
    "phi3": (
        "{%- for message in messages -%}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- else -%}{{ eos_token }}{%- endif -%}"
    ),
    # Stanford Alpaca's prompt, as a conversation: instruction turns and response turns
    "alpaca": (
        _FOLD_SYSTEM + "{{- (system or 'Below is an instruction that describes a task. Write a "
        "response that appropriately completes the request.') + '\\n\\n' -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
    ),
}


def resolve_chat_template(spec: str) -> str:
    """A chat template from a built-in name, a ``.jinja`` file, or Jinja source itself.

    Raises:
        ChatTemplateError: a name that is none of these (with the closest built-in name).
    """
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    hint = did_you_mean(spec, BUILTIN_TEMPLATES)
    raise ChatTemplateError(
        f"chat template '{spec}' is not a built-in name{hint}, a .jinja file, or Jinja source "
        f"(built-in: {', '.join(BUILTIN_TEMPLATES)})"
    )
