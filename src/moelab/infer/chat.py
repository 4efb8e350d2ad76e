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

from tokenizers import Tokenizer

from moelab.data.tokenizer import IM_END, IM_START, TextTokenizer

ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)


def _check(messages: Sequence[dict]) -> None:
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role = {role!r} is not allowed: one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for a list of {"role", "content"} messages (the same as CHAT_TEMPLATE)."""
    _check(messages)
    parts = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


class ChatEncoder:
    """Token ids of a conversation in the chat format, for serving.

    Unlike encoding `render_chat(...)`, message contents are encoded as plain text: a user who
    types "<|im_end|>" gets those characters, not the special token, and cannot forge turns. For
    any content without special-token strings the ids are the same."""

    def __init__(self, tokenizer: TextTokenizer):
        if not self.supports(tokenizer):
            raise ValueError(f"the tokenizer has no chat tokens {IM_START} and {IM_END}")
        self.tokenizer = tokenizer
        self._plain = Tokenizer.from_str(tokenizer.to_json())  # a private copy: the flag is per object
        self._plain.encode_special_tokens = True
        self.im_start = tokenizer.token_id(IM_START)
        self.im_end = tokenizer.token_id(IM_END)

    @staticmethod
    def supports(tokenizer: TextTokenizer) -> bool:
        """Whether the tokenizer has the chat tokens (an imported model's may not)."""
        return all(tokenizer.tokenizer.token_to_id(t) is not None for t in (IM_START, IM_END))

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with any special-token strings in it taken literally."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        _check(messages)
        newline = self.encode_text("\n")
        ids: list[int] = []
        for m in messages:
            ids += [
                self.im_start,
                *self.encode_text(f"{m['role']}\n"),
                *self.encode_text(m["content"]),
                self.im_end,
                *newline,
            ]
        if add_generation_prompt:
            ids += [self.im_start, *self.encode_text("assistant\n")]
        return ids

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Tokens that end an assistant turn."""
        return frozenset({self.im_end, self.tokenizer.eos_id})
