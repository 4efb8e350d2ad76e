"""The chat format of moelab models: ChatML turns with the tokenizer's special tokens.

    <|im_start|>system
    You are helpful.<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant
    ...generated until <|im_end|> (or <|endoftext|>)

The same format is exported as the Jinja `chat_template` of Hugging Face tokenizers, so a model
served by moelab and the same model loaded with transformers see identical prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

from moelab.data.tokenizer import IM_END, IM_START

ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for a list of {"role", "content"} messages (the same as CHAT_TEMPLATE)."""
    parts = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role = {role!r} is not allowed: one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)
