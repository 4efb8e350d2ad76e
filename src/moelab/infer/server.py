"""The OpenAI-compatible HTTP server: FastAPI routes over one Engine.

The app starts answering at once and loads the model in a background thread: /health says 503
until the engine runs, then 200. Generation requests are checked (moelab.infer.protocol), turned
into token ids, submitted to the engine and answered whole or as server-sent events. Every error is
answered in OpenAI's shape with its status, and the server keeps serving.

Routes: GET /health (open), GET /metrics, GET /v1/models, GET /v1/models/{id},
POST /v1/completions, POST /v1/chat/completions, and vLLM's POST /tokenize, POST /detokenize and
GET /tokenizer_info (which lm-evaluation-harness's remote tokenizer reads). With an API key, all
but /health need the header `Authorization: Bearer <key>`.

Chat prompts use the model's chat format (moelab.infer.chat_template.chat_format): the
tokenizer's Jinja template for imported models (or --chat-template), ChatML for moelab's own.

Connections (uvicorn_server): a request must arrive within the keep-alive timeout, and beyond
max_connections open connections a new request gets uvicorn's 503. A client that leaves before
its request is whole is answered 499 (never sent; counted in the metrics) and logged in one line.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from moelab.data.tokenizer import TextTokenizer
from moelab.infer import protocol as wire
from moelab.infer.chat import CHAT_TEMPLATE
from moelab.infer.chat_template import ChatFormat, ChatTemplateError, TemplateChat, chat_format
from moelab.infer.engine import (
    Chunk,
    Engine,
    EngineClosed,
    EngineConfig,
    EngineStats,
    Event,
    Failed,
    Finished,
    PromptLogprobs,
    QueueFull,
    TokenLogprob,
)
from moelab.infer.engine import Request as EngineRequest
from moelab.infer.logprobs import TokenStrings
from moelab.infer.metrics import CONTENT_TYPE, ServerMetrics
from moelab.infer.protocol import APIError, ChatBody, CompletionBody, bad_request
from moelab.model import Transformer

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the window
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 5.0  # uvicorn's default
DEFAULT_MAX_CONNECTIONS = 256
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; never sent, seen in logs and metrics


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = "moelab"  # the id clients send as `model`
    api_key: str | None = None  # None: no authentication
    max_body_bytes: int = 1 << 20
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class Servable:
    """What the server serves: a model in eval mode on its device, its tokenizer, and its chat
    template (Jinja text; None: ChatML for moelab's own tokenizers, no chat for others)."""

    model: Transformer
    tokenizer: TextTokenizer
    created: int = 0  # Unix time of the weights (GET /v1/models)
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # the template's bos_token, eos_token, ...
    chat_stop_ids: frozenset[int] = frozenset()  # besides the end-of-text token (generation_config.json)


def load_servable(path: str | Path, device: str = "auto", chat_template: str | None = None) -> Servable:
    """The newest checkpoint of a run directory, or one checkpoint directory; `chat_template`
    (Jinja text) overrides the one in the run's tokenizer files."""
    from moelab.device import resolve_device
    from moelab.infer.chat_template import read_run_chat_files
    from moelab.rundir import load_model

    loaded = load_model(path, resolve_device(device))
    files = read_run_chat_files(loaded.run.path)
    return Servable(
        loaded.model,
        loaded.tokenizer,
        int(loaded.checkpoint.stat().st_mtime),
        chat_template if chat_template is not None else files.template,
        files.special_tokens,
        files.eos_ids,
    )


class _State:
    """The app's model: loading, ready (with an engine) or failed."""

    def __init__(self):
        self.status = "loading"
        self.error: str | None = None
        self.engine: Engine | None = None
        self.chat: ChatFormat | None = None
        self.no_chat = "this model has no chat format"  # why, when chat is None
        self.chat_template: str | None = None  # for GET /tokenizer_info
        self.special_tokens: dict[str, str] = {}
        self.strings: TokenStrings | None = None
        self.created = 0

    def chat_format(self) -> ChatFormat:
        if self.chat is None:
            raise bad_request(self.no_chat, "messages", "chat_not_supported")
        return self.chat

    def stats(self) -> EngineStats | None:
        engine = self.engine
        return engine.stats() if engine is not None and self.status == "ready" else None

    def ready_engine(self) -> Engine:
        if self.status == "ready" and self.engine is not None:
            return self.engine
        if self.status == "failed":
            raise APIError(503, f"the model failed to load: {self.error}", "server_error", None, "model_load_failed")
        raise APIError(
            503,
            "the model is loading; retry shortly (GET /health says 200 when ready)",
            "server_error",
            None,
            "model_loading",
        )


def create_app(
    load: Callable[[], Servable],
    settings: ServerSettings = ServerSettings(),
    on_load_error: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app. `load` runs in a background thread after startup; if it raises, /health reports
    the error with 503 and `on_load_error` (if given) is called with the message."""
    settings.engine.validate()
    state = _State()
    metrics = ServerMetrics(state.stats)

    def load_in_background() -> None:
        try:
            servable = load()
            engine = Engine(servable.model, servable.tokenizer, settings.engine).start()
            _set_chat(state, servable)
            state.strings = TokenStrings(servable.tokenizer)
            state.created, state.engine = servable.created, engine
            state.status = "ready"
            log.info("model %r is ready", settings.model_name)
        except Exception as exc:  # reported on /health; the process decides whether to exit
            state.status, state.error = "failed", str(exc) or type(exc).__name__
            log.error("loading the model failed: %s", state.error)
            if on_load_error is not None:
                on_load_error(state.error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load_in_background, name="moelab-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.close()

    app = FastAPI(title="moelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    app.state.moelab = state
    app.state.metrics = metrics
    _add_error_handlers(app)

    def authorize(request: HTTPRequest) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(
                401,
                "missing API key: send the header 'Authorization: Bearer <key>'",
                "authentication_error",
                None,
                "missing_api_key",
            )
        # NOTE: compare_digest takes the same time wherever the strings differ, so the response
        # time tells an attacker nothing about how much of a guess was right. Starlette decodes
        # headers as latin-1, so encoding back gives the bytes the client sent (UTF-8 for a key).
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("latin-1"), settings.api_key.encode()
        ):
            raise APIError(401, "incorrect API key", "authentication_error", None, "invalid_api_key")

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {settings.model_name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    @app.get("/health")
    async def health() -> Response:
        if state.status == "ready":
            return JSONResponse({"status": "ok", "model": settings.model_name})
        return JSONResponse({"status": state.status, "error": state.error}, status_code=503)

    @app.get("/metrics")
    async def prometheus(request: HTTPRequest) -> Response:
        authorize(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: HTTPRequest) -> Response:
        authorize(request)
        state.ready_engine()
        return JSONResponse({"object": "list", "data": [wire.model_card(settings.model_name, state.created)]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: HTTPRequest) -> Response:
        authorize(request)
        state.ready_engine()
        check_model(model_id)
        return JSONResponse(wire.model_card(settings.model_name, state.created))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Response:
        authorize(request)
        engine = state.ready_engine()
        body = wire.parse_completion(await _read_json(request, settings.max_body_bytes), engine.config.max_batch)
        check_model(body.model)
        tokenizer = engine.tokenizer
        prompts = [_prompt_ids(p, tokenizer) for p in body.prompts]
        max_tokens = _fit_context(prompts, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, engine.context, "prompt")
        job = _engine_request(
            body,
            prompts,
            max_tokens,
            frozenset({tokenizer.eos_id}),
            logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if body.echo else None,
        )
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in body.prompts] if body.echo else None
        shape = _Shape(chat=False, logprobs=body.logprobs is not None, echo=echo, strings=state.strings)
        return await _respond(request, engine, metrics, body, job, shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        authorize(request)
        engine = state.ready_engine()
        body = wire.parse_chat(await _read_json(request, settings.max_body_bytes), engine.config.max_batch)
        check_model(body.model)
        chat = state.chat_format()
        prompt = _encode_chat(chat, body.messages, add_generation_prompt=True)
        max_tokens = _fit_context([prompt], body.max_tokens, None, engine.context, "messages")
        job = _engine_request(
            body, [prompt], max_tokens, chat.stop_token_ids, logprobs=body.top_logprobs if body.logprobs else None
        )
        shape = _Shape(chat=True, logprobs=body.logprobs, echo=None, strings=state.strings)
        return await _respond(request, engine, metrics, body, job, shape)

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest) -> Response:
        authorize(request)
        engine = state.ready_engine()
        body = wire.parse_tokenize(await _read_json(request, settings.max_body_bytes))
        if body.model is not None:
            check_model(body.model)
        if body.messages is not None:
            ids = _encode_chat(state.chat_format(), body.messages, body.add_generation_prompt, body.add_special_tokens)
        else:
            ids = engine.tokenizer.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens).ids
        answer: dict[str, Any] = {"count": len(ids), "max_model_len": engine.context, "tokens": ids}
        if body.return_token_strs:
            answer["token_strs"] = [engine.tokenizer.tokenizer.id_to_token(i) for i in ids]
        return JSONResponse(answer)

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest) -> Response:
        authorize(request)
        engine = state.ready_engine()
        body = wire.parse_detokenize(await _read_json(request, settings.max_body_bytes))
        if body.model is not None:
            check_model(body.model)
        _check_vocabulary(body.tokens, engine.tokenizer, "tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens, skip_special=False)})

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: HTTPRequest) -> Response:
        authorize(request)
        engine = state.ready_engine()
        tokenizer = engine.tokenizer
        info = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **state.special_tokens,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "bos_token": state.special_tokens.get("bos_token"),
            "chat_template": state.chat_template,
            "model_max_length": engine.context,
            "vocab_size": tokenizer.vocab_size,
        }
        return JSONResponse(info)

    return app


def _set_chat(state: _State, servable: Servable) -> None:
    """The served model's chat format; a template that does not parse leaves chat off (the
    message says why) and completions on."""
    fix = "start the server with --chat-template FILE (a Jinja chat template)"
    try:
        state.chat = chat_format(
            servable.tokenizer, servable.chat_template, servable.special_tokens, servable.chat_stop_ids
        )
    except ChatTemplateError as exc:
        state.chat, state.no_chat = None, f"this model's chat template does not parse ({exc}); {fix}"
        log.warning("chat is off: %s", state.no_chat)
        return
    state.special_tokens = dict(servable.special_tokens)
    if isinstance(state.chat, TemplateChat):
        state.chat_template = state.chat.source
    elif state.chat is not None:
        state.chat_template = CHAT_TEMPLATE
    else:
        state.no_chat = f"this model's tokenizer has no chat template; {fix}, or use /v1/completions"


def _encode_chat(
    chat: ChatFormat, messages, add_generation_prompt: bool = True, add_special_tokens: bool = False
) -> list[int]:
    if isinstance(chat, TemplateChat):
        try:
            return chat.encode(messages, add_generation_prompt, add_special_tokens)
        except ChatTemplateError as exc:
            raise bad_request(f"the chat template failed: {exc}", "messages", "chat_template_error") from None
    return chat.encode(messages, add_generation_prompt)


# ---------------------------------------------------------------------------------------------
# Requests in


async def _read_json(request: HTTPRequest, limit: int) -> Any:
    """The body as JSON; 413 past `limit` bytes (checked before reading when the length is
    declared, and while reading when it is not)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid Content-Length header")
        if int(declared) > limit:
            raise APIError(
                413,
                f"the request body is {int(declared)} bytes; the limit is {limit}",
                "invalid_request_error",
                None,
                "request_too_large",
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413,
                f"the request body exceeds the limit of {limit} bytes",
                "invalid_request_error",
                None,
                "request_too_large",
            )
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None


def _prompt_ids(prompt: str | tuple[int, ...], tokenizer: TextTokenizer) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt) or [tokenizer.eos_id]  # an empty prompt starts a new document
    _check_vocabulary(prompt, tokenizer, "prompt")
    return list(prompt)


def _check_vocabulary(ids, tokenizer: TextTokenizer, param: str) -> None:
    vocab = tokenizer.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"{param} token id {bad[0]} is outside the vocabulary [0, {vocab})", param)


def _fit_context(
    prompts: list[list[int]], max_tokens: int | None, default: int | None, context: int, param: str
) -> int:
    """max_tokens for every prompt: as asked (400 if it does not fit), else the default cut to the
    room left, else all the room left."""
    longest = max(len(p) for p in prompts)
    room = context - longest
    if max_tokens is not None:
        if longest + max_tokens > context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the completion). "
                "Please reduce the length of the prompt or max_tokens.",
                "max_tokens",
                "context_length_exceeded",
            )
        return max_tokens
    if room < 1:
        raise bad_request(
            f"This model's maximum context length is {context} tokens. However, the prompt is {longest} tokens, "
            "which leaves no room for the completion. Please reduce the length of the prompt.",
            param,
            "context_length_exceeded",
        )
    return room if default is None else min(default, room)


def _engine_request(
    body: CompletionBody | ChatBody,
    prompts: list[list[int]],
    max_tokens: int,
    stop_ids: frozenset[int],
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> EngineRequest:
    return EngineRequest(
        prompts=tuple(tuple(p) for p in prompts),
        max_tokens=max_tokens,
        params=body.params,
        n=body.n,
        seed=body.seed,
        stop=body.stop,
        stop_token_ids=stop_ids,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


# ---------------------------------------------------------------------------------------------
# Responses out


class _Subscription:
    """One request's engine events, delivered into this event loop; counts its metrics."""

    def __init__(self, engine: Engine, request: EngineRequest, metrics: ServerMetrics):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.metrics = metrics
        self.ended = False
        self._last_token_at: dict[int, float] = {}
        try:
            self.handle = engine.submit(request, self._sink)
        except QueueFull as exc:
            metrics.rejected.inc()
            raise APIError(
                429, f"the server is busy ({exc}); retry shortly", "rate_limit_error", None, "queue_full"
            ) from None
        except EngineClosed:
            raise APIError(503, "the server is shutting down", "server_error", None, "shutting_down") from None
        metrics.prompt_tokens.inc(request.prompt_tokens)

    def _sink(self, event: Event) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def next(self) -> Event:
        event = await self.events.get()
        if isinstance(event, Chunk):
            self.metrics.generation_tokens.inc()
            previous = self._last_token_at.get(event.index)
            if previous is not None:
                self.metrics.time_per_output_token.observe(event.time - previous)
            self._last_token_at[event.index] = event.time
        elif isinstance(event, Finished):
            self.ended = True
            self.metrics.time_to_first_token.observe(event.first_token_s)
            self.metrics.queue_time.observe(event.queued_s)
        elif isinstance(event, Failed):
            self.ended = True
        return event

    def close(self) -> None:
        """The response is over: if the request is not, its client left; free its rows."""
        if not self.ended:
            self.ended = True
            self.handle.cancel()
            self.metrics.cancelled.inc()


@dataclass(frozen=True)
class _Shape:
    """How a response is built: chat or completion, with logprobs or not, and the prompts'
    texts when they are echoed."""

    chat: bool
    logprobs: bool
    echo: list[str] | None
    strings: TokenStrings | None


@dataclass
class _Collected:
    texts: list[list[str]]
    reasons: list[str]
    logprobs: list[list[TokenLogprob]]  # per choice, per generated token (when asked)
    prompt_logprobs: dict[int, tuple[TokenLogprob | None, ...]]  # per prompt (when asked)


async def _respond(
    request: HTTPRequest, engine: Engine, metrics: ServerMetrics, body, job: EngineRequest, shape: _Shape
) -> Response:
    chat = shape.chat
    sub = _Subscription(engine, job, metrics)
    response_id, created = wire.new_id("chatcmpl" if chat else "cmpl"), wire.now()
    if body.stream:
        stream = _sse(sub, job, body, response_id, created, shape)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    collect = asyncio.ensure_future(_collect(sub, job.choices))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()
        sub.close()
    if not collect.done() or collect.cancelled():
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody is listening
    got, finished = collect.result()
    use = wire.usage(finished.prompt_tokens, finished.completion_tokens)
    texts = ["".join(t) for t in got.texts]
    reasons = [r or "length" for r in got.reasons]  # max_tokens 0: no token, cut by the length
    logprobs: list[dict | None] | None = None
    if chat:
        if shape.logprobs:
            logprobs = [wire.chat_logprobs([shape.strings.entry(t) for t in lps]) for lps in got.logprobs]
        return JSONResponse(wire.chat_response(response_id, created, body.model, texts, reasons, use, logprobs))
    if shape.echo is not None:
        texts = [shape.echo[i // job.n] + t for i, t in enumerate(texts)]
    if shape.logprobs:
        logprobs = []
        for i, lps in enumerate(got.logprobs):
            entries = [shape.strings.entry(t) for t in lps]
            if shape.echo is not None:
                p = i // job.n
                entries = shape.strings.prompt_entries(job.prompts[p], got.prompt_logprobs[p]) + entries
            logprobs.append(wire.completion_logprobs(entries))
    return JSONResponse(wire.completion_response(response_id, created, body.model, texts, reasons, use, logprobs))


async def _collect(sub: _Subscription, choices: int) -> tuple[_Collected, Finished]:
    got = _Collected([[] for _ in range(choices)], [""] * choices, [[] for _ in range(choices)], {})
    while True:
        event = await sub.next()
        if isinstance(event, Chunk):
            got.texts[event.index].append(event.text)
            if event.logprob is not None:
                got.logprobs[event.index].append(event.logprob)
            if event.finish_reason:
                got.reasons[event.index] = event.finish_reason
        elif isinstance(event, PromptLogprobs):
            got.prompt_logprobs[event.prompt] = event.logprobs
        elif isinstance(event, Finished):
            return got, event
        else:
            raise APIError(500, event.message, "server_error", None, "generation_failed")


async def _client_gone(request: HTTPRequest) -> None:
    """Returns when the client disconnects (the body is read already, so the next ASGI message
    can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse_line(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


async def _sse(
    sub: _Subscription, job: EngineRequest, body, response_id: str, created: int, shape: _Shape
) -> AsyncIterator[str]:
    """Server-sent events: chunks as tokens become text (with the token's logprobs when asked,
    also for a token whose text is held back), an optional usage chunk, then [DONE]. Starlette
    cancels this generator when the client disconnects; `finally` frees the rows."""
    model, chat = body.model, shape.chat
    offsets = [0] * job.choices  # completions' text_offset: characters of token text so far
    try:
        if chat:
            for index in range(job.choices):
                yield _sse_line(
                    wire.chat_chunk(response_id, created, model, index, {"role": "assistant", "content": ""}, None)
                )
        while True:
            event = await sub.next()
            if isinstance(event, Chunk):
                entry = shape.strings.entry(event.logprob) if event.logprob is not None else None
                if chat:
                    if event.text or entry:
                        lps = wire.chat_logprobs([entry]) if entry else None
                        delta = {"content": event.text}
                        yield _sse_line(wire.chat_chunk(response_id, created, model, event.index, delta, None, lps))
                    if event.finish_reason:
                        yield _sse_line(
                            wire.chat_chunk(response_id, created, model, event.index, {}, event.finish_reason)
                        )
                elif event.text or event.finish_reason or entry:
                    lps = None
                    if entry:
                        lps = wire.completion_logprobs([entry], offsets[event.index])
                        offsets[event.index] += len(entry.token)
                    yield _sse_line(
                        wire.completion_chunk(
                            response_id, created, model, event.index, event.text, event.finish_reason, lps
                        )
                    )
            elif isinstance(event, PromptLogprobs):
                continue  # echo is refused with stream
            elif isinstance(event, Finished):
                if body.include_usage:
                    use = wire.usage(event.prompt_tokens, event.completion_tokens)
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield _sse_line(wire.usage_chunk(response_id, created, model, obj, use))
                break
            else:
                yield _sse_line(wire.error_body(event.message, "server_error", None, "generation_failed"))
                break
        yield _sse_line("[DONE]")
    finally:
        sub.close()


# ---------------------------------------------------------------------------------------------
# Errors and metrics


def _add_error_handlers(app: FastAPI) -> None:
    def answer(
        status: int, message: str, type: str, param: str | None = None, code: str | None = None, headers=None
    ) -> JSONResponse:
        return JSONResponse(wire.error_body(message, type, param, code), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return answer(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return answer(
            exc.status_code,
            f"{request.method} {request.url.path}: {exc.detail}",
            "invalid_request_error",
            None,
            code,
            exc.headers,
        )

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: HTTPRequest, exc: ClientDisconnect) -> Response:
        # NOTE: raised while reading the body when the client closed the connection, or the
        # connection timed out (_H11Protocol): the client's doing, so no 500 and no traceback
        log.info("%s %s: the client left before sending its whole request", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        return answer(400, f"invalid request: {exc.errors()}", "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(request: HTTPRequest, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return answer(500, f"internal server error: {type(exc).__name__}", "server_error")


_ENDPOINTS = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
)


class _MetricsMiddleware:
    """Counts every HTTP response by endpoint and status and times it to its last byte (a plain
    ASGI middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from streams)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = next(
            (e for e in _ENDPOINTS if path == e or (e == "/v1/models" and path.startswith(e + "/"))), "other"
        )
        status = 500
        start = time.perf_counter()

        async def send_and_watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Running


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: any free port); raises OSError."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class _H11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request to arrive: its request line
    and headers within timeout_keep_alive seconds (however slowly their bytes trickle in), and its
    body with no pause longer than that. A connection that misses it is closed without an answer.

    NOTE: uvicorn (0.54) arms timeout_keep_alive only after a response, so a connection that
    never completed a request (nothing sent, half a request line, headers without their end, a
    body cut short) stayed open for ever; no uvicorn setting bounds it. This uses that setting's
    value, and h11 only: uvicorn would pick httptools if installed, which has the same gap."""

    _request_timer: asyncio.TimerHandle | None = None
    _awaiting: str | None = None  # "headers" or "body" while the timer runs

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_request()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_request_timer()
        super().connection_lost(exc)

    def _watch_request(self) -> None:
        state = self.conn.their_state
        awaiting = None
        if not self.transport.is_closing() and state in (h11.IDLE, h11.SEND_BODY):
            awaiting = "headers" if state is h11.IDLE else "body"
        if awaiting == "headers" and self._awaiting == "headers":
            return  # bytes of the headers do not move their deadline
        self._stop_request_timer()
        if awaiting is not None:
            self._awaiting = awaiting
            self._request_timer = self.loop.call_later(self.timeout_keep_alive, self._request_timed_out)

    def _stop_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        self._request_timer, self._awaiting = None, None

    def _request_timed_out(self) -> None:
        client = "%s:%d" % self.client if self.client else "a client"
        log.debug(
            "closing the connection of %s: no whole request %s within %gs",
            client,
            self._awaiting,
            self.timeout_keep_alive,
        )
        self._request_timer, self._awaiting = None, None
        self.transport.close()


def uvicorn_server(
    app: FastAPI,
    host: str,
    port: int,
    log_level: str = "info",
    timeout_keep_alive: float = DEFAULT_TIMEOUT_KEEP_ALIVE_S,
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
) -> uvicorn.Server:
    """A uvicorn server for the app; run it with server.run(sockets=[bind(host, port)]).

    timeout_keep_alive: seconds a connection may wait for its next request, and the deadline for
    a request to arrive (_H11Protocol). max_connections: open connections served; with more, a
    new request gets uvicorn's 503 (None: no limit). Raises ValueError for values out of range."""
    if not (math.isfinite(timeout_keep_alive) and timeout_keep_alive > 0):
        raise ValueError(f"timeout_keep_alive = {timeout_keep_alive} is not allowed: a number of seconds > 0")
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"max_connections = {max_connections} is not allowed: an integer >= 1")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=_H11Protocol,
        timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]  # uvicorn says int; call_later takes a float
        # NOTE: uvicorn answers 503 once the open connections, the new one included, reach
        # limit_concurrency: N + 1 serves N
        limit_concurrency=None if max_connections is None else max_connections + 1,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


class BackgroundServer:
    """The app served by uvicorn on a thread, on a free localhost port (tests and benchmarks)."""

    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        log_level: str = "warning",
        timeout_keep_alive: float = DEFAULT_TIMEOUT_KEEP_ALIVE_S,
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
    ):
        self.sock = bind(host, 0)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn_server(app, host, self.port, log_level, timeout_keep_alive, max_connections)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="moelab-uvicorn", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
