"""Answering one generation request from the engine's event stream.

`respond` submits the request to the engine (429 when its queue is full, 503 while it shuts down)
and answers with the whole response in OpenAI's shape, or, with `stream`, as server-sent events:
chunks as tokens become text, an optional usage chunk, then [DONE]. `Shape` says how the response
is built (chat or completion, logprobs, echoed prompts). The request's token and latency metrics are
counted as its events arrive. A client that leaves before its answer frees its rows in the engine;
a non-streamed request whose client left is answered 499 (CLIENT_CLOSED_REQUEST: never sent, seen in
logs and metrics).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from moelab.infer import protocol as wire
from moelab.infer.engine import (
    Chunk,
    Engine,
    EngineClosed,
    Event,
    Failed,
    Finished,
    PromptLogprobs,
    QueueFull,
    TokenLogprob,
)
from moelab.infer.engine import Request as EngineRequest
from moelab.infer.logprobs import TokenStrings
from moelab.infer.metrics import ServerMetrics
from moelab.infer.protocol import APIError

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; never sent, seen in logs and metrics


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
class Shape:
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


async def respond(
    request: HTTPRequest, engine: Engine, metrics: ServerMetrics, body, job: EngineRequest, shape: Shape
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
    sub: _Subscription, job: EngineRequest, body, response_id: str, created: int, shape: Shape
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
