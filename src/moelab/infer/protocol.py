"""The OpenAI wire format: request bodies checked into typed requests, response and stream-chunk
bodies, and the error shape {"error": {"message", "type", "param", "code"}}.

Checks here need no model; token counts and the context window are checked by the server.

Log-probabilities (`logprobs`): completions take an integer 0..MAX_LOGPROBS, the number of
alternatives per token, and answer in the legacy shape {tokens, token_logprobs, top_logprobs,
text_offset}; with `echo` the prompt's tokens come first (the first with logprob null), and
`max_tokens` 0 (only with echo) scores the prompt without generating. Chat takes `logprobs: true`
and `top_logprobs` 0..MAX_LOGPROBS and answers {"content": [{token, logprob, bytes, top_logprobs}]}.
Every string of a body (values and field names) must be valid Unicode: JSON may escape a lone
surrogate ("\\ud800"), which no tokenizer or UTF-8 encoder accepts, so `check_text` answers 400
naming the field before any other check reads the body.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from moelab.infer.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's and vLLM's default limit
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class GenerationBody:
    """What completions and chat requests share, checked."""

    model: str
    max_tokens: int | None  # None: the endpoint's default
    params: SamplingParams
    n: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


@dataclass(frozen=True)
class CompletionBody(GenerationBody):
    prompts: tuple[str | tuple[int, ...], ...] = ()  # text, or token ids
    logprobs: int | None = None  # alternatives per token; None: no logprobs
    echo: bool = False  # the prompt comes back first in the text (and in logprobs)


@dataclass(frozen=True)
class ChatBody(GenerationBody):
    messages: tuple[dict[str, str], ...] = ()  # {"role": system|user|assistant, "content": text}
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class TokenizeBody:
    """POST /tokenize: text, or a conversation in the model's chat format (vLLM's shape)."""

    model: str | None
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    add_special_tokens: bool
    add_generation_prompt: bool
    return_token_strs: bool


@dataclass(frozen=True)
class DetokenizeBody:
    model: str | None
    tokens: tuple[int, ...]


_SHARED = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream", "stream_options",
           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user"}  # fmt: skip
_COMPLETION_ONLY = {"prompt", "echo", "best_of", "suffix"}
_CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
              "parallel_tool_calls", "functions", "function_call", "metadata", "store", "service_tier", "modalities"}  # fmt: skip


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise bad_request(f"{name} = {value!r} is not allowed: a number in {bracket}{low:g}, {high:g}]", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise bad_request(f"{name} = {value!r} is not allowed: {allowed}", name)
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} = {value!r} is not allowed: true or false", name)
    return value


def _unsupported(body: dict, name: str, is_default) -> None:
    if name in body and body[name] is not None and not is_default(body[name]):
        raise bad_request(f"{name} = {body[name]!r} is not supported by this server", name, "unsupported_parameter")


def check_text(body: Any) -> None:
    """400 naming the first string of the body, in document order, that is not valid Unicode: a
    value (param e.g. `messages[1].content`) or a field name (param: the object holding it)."""
    # NOTE: json.loads turns a \ud800 escape, and the UTF-8-style bytes ED A0 80 (it decodes bytes
    # with "surrogatepass"), into a str holding a lone surrogate; walked without recursion, as deep
    # as json.loads allows; the path of a string is built only if it is reported.
    stack: list[tuple[Any, tuple]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_unicode(value, path)
        elif isinstance(value, dict):
            for key in value:
                _check_unicode(key, path, field_name=True)
            stack.extend((v, (path, k)) for k, v in reversed(value.items()) if isinstance(v, str | dict | list))
        elif isinstance(value, list):
            children = [(v, (path, i)) for i, v in enumerate(value) if isinstance(v, str | dict | list)]
            stack.extend(reversed(children))


def _check_unicode(text: str, path: tuple, field_name: bool = False) -> None:
    if text.isascii():  # O(1) in CPython
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        param = _param(path)
        where = f"a field name in {param or 'the request body'}" if field_name else param
        raise bad_request(
            f"{where} is not valid Unicode: character {exc.start} is the lone surrogate "
            f"U+{ord(text[exc.start]):04X}; text must be Unicode scalar values (surrogates only as pairs)",
            param,
        ) from None


def _param(path: tuple) -> str | None:
    """("messages", 1, "content") as nested pairs -> "messages[1].content"; () -> None."""
    keys = []
    while path:
        path, key = path
        keys.append(key)
    if not keys:
        return None
    keys.reverse()
    return keys[0] + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys[1:])


def _shared(body: Any, allowed: set[str], max_choices: int) -> dict[str, Any]:
    body = _object(body)
    _known(body, allowed)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: the name of a model from GET /v1/models", "model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream = {stream!r} is not allowed: true or false", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if (
            not isinstance(options, dict)
            or set(options) - {"include_usage"}
            or not isinstance(options.get("include_usage", False), bool)
        ):
            raise bad_request('stream_options must be {"include_usage": true|false}', "stream_options")
        include_usage = options.get("include_usage", False)
    top_k = _integer(body, "top_k", 0, -1)
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # -1 also means off (as in vLLM)
    )
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_STRINGS:
        stop = tuple(stop)
    else:
        raise bad_request(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    if any(not s for s in stop):
        raise bad_request("stop strings must not be empty", "stop")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad_request(f"seed = {seed!r} is not allowed: an integer", "seed")
    for name in ("presence_penalty", "frequency_penalty"):
        _number(body, name, 0.0, -2.0, 2.0)
        _unsupported(body, name, lambda v: v == 0)
    _unsupported(body, "logit_bias", lambda v: v == {})
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_request("user must be a string", "user")
    return dict(
        model=model,
        params=params,
        n=_integer(body, "n", 1, 1, max_choices),
        seed=seed,
        stop=stop,
        stream=bool(stream),
        include_usage=include_usage,
    )


def parse_completion(body: Any, max_choices: int) -> CompletionBody:
    """Check a POST /v1/completions body."""
    shared = _shared(body, _SHARED | _COMPLETION_ONLY, max_choices)
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = _boolean(body, "echo", False)
    if echo and shared["stream"]:
        raise bad_request("echo is not supported with stream; send stream=false", "echo", "unsupported_parameter")
    max_tokens = _integer(body, "max_tokens", None, 0)
    if max_tokens == 0 and not echo:
        raise bad_request(
            "max_tokens = 0 is only allowed with echo=true (to score the prompt without generating): an integer >= 1",
            "max_tokens",
        )
    _unsupported(body, "suffix", lambda v: v == "")
    _unsupported(body, "best_of", lambda v: v == shared["n"])
    prompts = _prompts(body.get("prompt"))
    if len(prompts) * shared["n"] > max_choices:
        raise bad_request(
            f"{len(prompts)} prompts x n={shared['n']} choices exceed this server's limit of {max_choices}", "n"
        )
    return CompletionBody(max_tokens=max_tokens, prompts=prompts, logprobs=logprobs, echo=echo, **shared)


def _prompts(prompt: Any) -> tuple[str | tuple[int, ...], ...]:
    if isinstance(prompt, str):
        return (prompt,)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return tuple(prompt)
        if all(_is_int(t) for t in prompt):
            return (tuple(prompt),)
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return tuple(tuple(p) for p in prompt)
    raise bad_request(
        "prompt is required: a string, a list of strings, a list of token ids, or a list of such lists (none empty)",
        "prompt",
    )


def parse_chat(body: Any, max_choices: int) -> ChatBody:
    """Check a POST /v1/chat/completions body."""
    shared = _shared(body, _SHARED | _CHAT_ONLY, max_choices)
    logprobs = _boolean(body, "logprobs", False)
    top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    if top_logprobs and not logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    _unsupported(body, "response_format", lambda v: v == {"type": "text"})
    _unsupported(body, "tools", lambda v: v == [])
    _unsupported(body, "functions", lambda v: v == [])
    _unsupported(body, "tool_choice", lambda v: v == "none")
    _unsupported(body, "function_call", lambda v: v == "none")
    _unsupported(body, "modalities", lambda v: v == ["text"])
    max_tokens = _integer(body, "max_tokens", None, 1)
    max_completion = _integer(body, "max_completion_tokens", None, 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise bad_request("max_tokens and max_completion_tokens differ; send one of them", "max_completion_tokens")
    messages = _messages(body.get("messages"))
    return ChatBody(
        max_tokens=max_completion if max_completion is not None else max_tokens,
        messages=messages,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        **shared,
    )


def parse_tokenize(body: Any) -> TokenizeBody:
    """Check a POST /tokenize body: {"prompt": text, "add_special_tokens": true} or {"messages":
    [...], "add_generation_prompt": true, "add_special_tokens": false} (vLLM's defaults)."""
    body = _object(body)
    chat = "messages" in body
    allowed = {"model", "add_special_tokens", "return_token_strs"}
    allowed |= {"messages", "add_generation_prompt", "continue_final_message"} if chat else {"prompt"}
    _known(body, allowed)
    model = _optional_model(body)
    _unsupported(body, "continue_final_message", lambda v: v is False)
    prompt = None
    if not chat:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("prompt is required: a string (or send messages for a conversation)", "prompt")
    return TokenizeBody(
        model=model,
        prompt=prompt,
        messages=_messages(body.get("messages")) if chat else None,
        add_special_tokens=_boolean(body, "add_special_tokens", not chat),
        add_generation_prompt=_boolean(body, "add_generation_prompt", True),
        return_token_strs=_boolean(body, "return_token_strs", False),
    )


def parse_detokenize(body: Any) -> DetokenizeBody:
    """Check a POST /detokenize body: {"tokens": [ids]} (ids are checked against the vocabulary
    by the server)."""
    body = _object(body)
    _known(body, {"model", "tokens"})
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise bad_request("tokens is required: a list of token ids", "tokens")
    return DetokenizeBody(model=_optional_model(body), tokens=tuple(tokens))


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    check_text(body)
    return body


def _known(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unrecognized_argument")


def _optional_model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise bad_request("model must be the name of a model from GET /v1/models", "model")
    return model


def _messages(messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages is required: a non-empty list of {role, content} objects", "messages")
    checked = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object with role and content", param)
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise bad_request(
                f"{param}.{extra[0]} is not supported by this server", f"{param}.{extra[0]}", "unsupported_parameter"
            )
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"{param}.role = {role!r} is not allowed: one of {sorted(CHAT_ROLES)}", f"{param}.role")
        checked.append({"role": CHAT_ROLES[role], "content": _content(message.get("content"), f"{param}.content")})
    return tuple(checked)


def _content(content: Any, param: str) -> str:
    """A string, or a list of text parts ({"type": "text", "text": ...}) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(
                    f"{param}[{j}] must be a text part {{'type': 'text', 'text': ...}}; only text is supported",
                    f"{param}[{j}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{param} must be a string or a non-empty list of text parts", param)


# ---------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "moelab"}


@dataclass(frozen=True)
class LogprobEntry:
    """One token's log-probability as the wire shows it: its text and UTF-8 bytes (a token may
    hold part of a character: then the text is "bytes:\\xNN..." as OpenAI writes it), logprob
    None for a prompt's first token, and the most likely alternatives (text, bytes, logprob)."""

    token: str
    bytes: tuple[int, ...]
    logprob: float | None
    top: tuple[tuple[str, tuple[int, ...], float], ...] = ()


def _finite(logprob: float) -> float:
    # NOTE: JSON has no -inf or NaN; -9999.0 stands for "impossible", as vLLM writes it
    return logprob if math.isfinite(logprob) else -9999.0


def completion_logprobs(entries: list[LogprobEntry], text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape. top_logprobs maps each alternative's text to its logprob
    and holds the chosen token too (so up to N+1 entries, as OpenAI documents); null where the
    logprob is null. text_offset: where each token starts, the cumulative lengths of the token
    texts from `text_offset` (as vLLM counts them)."""
    offsets, at = [], text_offset
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    tops: list[dict[str, float] | None] = []
    for entry in entries:
        if entry.logprob is None:
            tops.append(None)
            continue
        top = {text: _finite(lp) for text, _, lp in entry.top}
        top.setdefault(entry.token, _finite(entry.logprob))
        tops.append(top)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [None if e.logprob is None else _finite(e.logprob) for e in entries],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": _finite(e.logprob if e.logprob is not None else -9999.0),
                "bytes": list(e.bytes),
                "top_logprobs": [{"token": t, "logprob": _finite(lp), "bytes": list(b)} for t, b, lp in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_response(
    id: str,
    created: int,
    model: str,
    texts: list[str],
    reasons: list[str],
    use: dict,
    logprobs: list[dict | None] | None = None,
) -> dict[str, Any]:
    logprobs = logprobs or [None] * len(texts)
    choices = [
        {"index": i, "text": t, "logprobs": lp, "finish_reason": r}
        for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))
    ]
    return {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices, "usage": use}


def chat_response(
    id: str,
    created: int,
    model: str,
    texts: list[str],
    reasons: list[str],
    use: dict,
    logprobs: list[dict | None] | None = None,
) -> dict[str, Any]:
    logprobs = logprobs or [None] * len(texts)
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp, "finish_reason": r}
        for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))
    ]
    return {"id": id, "object": "chat.completion", "created": created, "model": model, "choices": choices, "usage": use}


def completion_chunk(
    id: str, created: int, model: str, index: int, text: str, reason: str | None, logprobs: dict | None = None
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    return {"id": id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_chunk(
    id: str, created: int, model: str, index: int, delta: dict, reason: str | None, logprobs: dict | None = None
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(id: str, created: int, model: str, object: str, use: dict) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": use}
