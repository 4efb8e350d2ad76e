"""The OpenAI-compatible HTTP server: FastAPI routes over one Engine.

This module holds the server's settings and what it serves (ServerSettings, Servable,
load_servable), the app (`create_app`: its state and routes), the steps from an HTTP request to an
engine request, and the error handlers. Answering a generation request from the engine's events is
moelab.infer.responses; uvicorn, the sockets and the request metrics middleware are
moelab.infer.http_transport.

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

A client that leaves before its request is whole is answered 499 (never sent; counted in the
metrics) and logged in one line.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from moelab.data.tokenizer import TextTokenizer
from moelab.infer import protocol as wire
from moelab.infer.chat import CHAT_TEMPLATE
from moelab.infer.chat_template import ChatFormat, ChatTemplateError, TemplateChat, chat_format
from moelab.infer.engine import Engine, EngineConfig, EngineStats
from moelab.infer.engine import Request as EngineRequest
from moelab.infer.http_transport import MetricsMiddleware
from moelab.infer.logprobs import TokenStrings
from moelab.infer.metrics import CONTENT_TYPE, ServerMetrics
from moelab.infer.protocol import APIError, ChatBody, CompletionBody, bad_request
from moelab.infer.responses import CLIENT_CLOSED_REQUEST, Shape, respond
from moelab.model import Transformer

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the window


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
    app.add_middleware(MetricsMiddleware, metrics=metrics)
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
        shape = Shape(chat=False, logprobs=body.logprobs is not None, echo=echo, strings=state.strings)
        return await respond(request, engine, metrics, body, job, shape)

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
        shape = Shape(chat=True, logprobs=body.logprobs, echo=None, strings=state.strings)
        return await respond(request, engine, metrics, body, job, shape)

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
# Errors


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
