"""Chat templates: the Jinja `chat_template` of Hugging Face tokenizers, and which chat format a
served model uses.

A model imported from Hugging Face keeps its tokenizer files in the run directory
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`; the first wins, as in
transformers). Its conversations are rendered with that template and the text is encoded with
the tokenizer, as `transformers`' `apply_chat_template(..., tokenize=True)` does: the same token
ids. The template runs in Jinja's immutable sandbox with what transformers gives templates
(`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, `trim_blocks` and
`lstrip_blocks`, loop controls, the `{% generation %}` tag, the tokenizer's special tokens as
variables), so templates from the Hub render here as they do there. The sandbox refuses access
to Python internals (`''.__class__`, `cycler.__init__.__globals__`): such a template fails to
render, which the server answers with a 400.

NOTE: because the rendered text is encoded whole, special-token strings inside message contents
("<|im_end|>") are read as the template's special tokens, as transformers does by default: a user
can forge turns. moelab's own models keep `moelab.infer.chat.ChatEncoder`, which encodes contents
as plain text.

`chat_format` picks the format: a template (the run's, or one given with `--chat-template`),
else moelab's ChatML for moelab's own tokenizers, else none (chat requests get a 400 naming
`--chat-template FILE`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moelab.data.tokenizer import EOS, HF_TOKENIZER_CONFIG, PAD, TextTokenizer
from moelab.errors import MoelabError
from moelab.infer.chat import ChatEncoder

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' file for a tokenizer's template
GENERATION_CONFIG = "generation_config.json"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A chat template that does not parse, or that failed to render a conversation (the
    message is the template's own, e.g. from raise_exception)."""


# ---------------------------------------------------------------------------------------------
# The sandbox


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # NOTE: Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() without underscore-prefixed attributes (no way to set dunders)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks in
    transformers; for serving it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag], autoescape=False
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env


_ENV = _environment()


def compile_chat_template(source: str) -> jinja2.Template:
    """The template compiled in the sandbox; ChatTemplateError naming the line if it does not parse."""
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"line {exc.lineno}: {exc.message}") from None


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass
class TemplateChat:
    """Token ids of a conversation rendered with a Jinja chat template.

    Contents are not escaped: special-token strings in them become special tokens (module
    docstring). stop_token_ids: the tokenizer's end-of-text and `extra_stop_ids` (the
    generation config's eos_token_id, e.g. <|im_end|> for Qwen instruct models)."""

    tokenizer: TextTokenizer
    source: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    extra_stop_ids: frozenset[int] = frozenset()

    def __post_init__(self):
        self.template = compile_chat_template(self.source)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text; ChatTemplateError with the template's message if rendering fails."""
        plain = [dict(m) for m in messages]  # fresh dicts: a template cannot change the caller's
        try:
            return self.template.render(
                messages=plain,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(str(exc) or type(exc).__name__) from None
        except Exception as exc:  # the template's own code failed (e.g. 'a' + 1): its error, not ours
            raise ChatTemplateError(f"{type(exc).__name__}: {exc}") from None

    def encode(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
    ) -> list[int]:
        text = self.render(messages, add_generation_prompt)
        return self.tokenizer.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return frozenset({self.tokenizer.eos_id}) | self.extra_stop_ids


ChatFormat = ChatEncoder | TemplateChat


def chat_format(
    tokenizer: TextTokenizer,
    template: str | None,
    special_tokens: Mapping[str, str] | None = None,
    extra_stop_ids: frozenset[int] = frozenset(),
) -> ChatFormat | None:
    """The template if there is one; else ChatML for moelab's own tokenizers; else None.
    Raises ChatTemplateError for a template that does not parse."""
    if template is not None:
        return TemplateChat(tokenizer, template, dict(special_tokens or {}), extra_stop_ids)
    own = (tokenizer.eos_token, tokenizer.pad_token) == (EOS, PAD)
    if own and ChatEncoder.supports(tokenizer):
        return ChatEncoder(tokenizer)
    return None


# ---------------------------------------------------------------------------------------------
# Files


def read_chat_template(path: str | Path) -> str:
    """A template file (`--chat-template FILE`), checked to parse; MoelabError otherwise."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoelabError(f"--chat-template {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MoelabError(f"--chat-template {path}: cannot be read: {exc}") from None
    try:
        compile_chat_template(source)
    except ChatTemplateError as exc:
        raise MoelabError(f"--chat-template {path}: not a valid Jinja template: {exc}") from None
    return source


@dataclass(frozen=True)
class RunChatFiles:
    """What a run directory's Hugging Face tokenizer files say about chat (all empty for
    moelab's own runs, which have none of these files)."""

    template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    eos_ids: frozenset[int] = frozenset()  # generation_config.json's eos_token_id


def read_run_chat_files(run_dir: str | Path) -> RunChatFiles:
    run_dir = Path(run_dir)
    config = _json(run_dir / HF_TOKENIZER_CONFIG)
    template = None
    if (run_dir / CHAT_TEMPLATE_FILE).is_file():
        template = (run_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    else:
        template = _config_template(config.get("chat_template"))
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):  # an AddedToken object: {"content": "</s>", ...}
            value = value.get("content")
        if isinstance(value, str) and value:
            special[name] = value
    eos = _json(run_dir / GENERATION_CONFIG).get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos]
    return RunChatFiles(template, special, frozenset(i for i in eos_ids if isinstance(i, int) and i >= 0))


def _config_template(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: one template, or a list of named ones ("default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoelabError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}
