"""The inference engine: continuous batching over one KV cache, driven by one thread.

Requests are submitted from any thread and wait in a FIFO queue. One engine thread owns the model
and the cache and repeats one step:

1. drop the sequences of cancelled requests (their cache rows are free again);
2. admit waiting requests while cache rows and the prefill budget allow, and prefill their prompts
   in one padded forward (choices of the same prompt share it: the prompt's keys are copied);
3. decode one token for every live sequence in one forward, sample, hand out the text.

Log-probabilities, when a request asks for them, come from the logits of the same forward that
scored the token (prefill for the prompt, decode for generated tokens), in float32, of the raw
distribution (before temperature, top-k and top-p): `Request.logprobs` for generated tokens,
`Request.prompt_logprobs` for the prompt (the `PromptLogprobs` event, before any Chunk). A
request with max_tokens 0 is prefilled only: it scores its prompt and finishes.

A request that arrives while others decode is admitted at the next step. Live sequences occupy
cache rows 0..B-1 (a finished sequence's row is filled by moving the last one), so a decode step
reads the cache through views and never gathers it.

Events (`Chunk`, then `Finished`, or `Failed`) go to the request's sink, called on the engine
thread: a sink must be quick and must not block (put into a queue, or hand over to an event loop).

Shape legend: B live sequences, P prompts being prefilled, T tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from moelab.data.tokenizer import TextTokenizer
from moelab.infer.moe_layer import prepare_for_inference
from moelab.infer.sampling import (
    SEED_MODULUS,
    SamplingParams,
    draw_uniform,
    sample_rows,
    seeded_generator,
)
from moelab.infer.textstream import TextStream
from moelab.model import KVCache, Transformer

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests already."""


class EngineClosed(Exception):
    """The engine was shut down (or never started)."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16  # sequences decoded together (KV-cache rows)
    max_queue: int = 64  # requests waiting for rows before submit() refuses
    max_prefill_tokens: int = 4096  # padded prompt tokens prefilled in one step (at least one request)

    def validate(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch = {self.max_batch} is not allowed: an integer >= 1")
        if self.max_queue < 0:
            raise ValueError(f"max_queue = {self.max_queue} is not allowed: an integer >= 0")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens = {self.max_prefill_tokens} is not allowed: an integer >= 1")


@dataclass(frozen=True)
class Request:
    """What to generate. Choice `p * n + j` is the j-th sample for prompt p."""

    prompts: tuple[tuple[int, ...], ...]  # token ids, each non-empty
    max_tokens: int  # per choice (0: score the prompt only); prompt length + max_tokens must fit the context
    params: SamplingParams = SamplingParams()
    n: int = 1
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()  # generating one of these ends the choice
    logprobs: int | None = None  # per generated token: its log-probability and the top-N alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (PromptLogprobs)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw distribution at its position, and the
    `top` most likely tokens there (id, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """New text of one choice (one per generated token; text may be "" while it is held back)."""

    index: int
    text: str
    tokens: int  # tokens generated for this choice so far
    finish_reason: str | None  # "stop" | "length" on the last chunk of the choice
    time: float  # time.perf_counter() when the token was sampled
    token: int = -1  # the generated token's id
    logprob: TokenLogprob | None = None  # when the request asked for logprobs


@dataclass(frozen=True)
class PromptLogprobs:
    """The log-probabilities of prompt `prompt`'s tokens: None for the first (nothing predicts
    it), then one per token, each given the tokens before it."""

    prompt: int
    logprobs: tuple[TokenLogprob | None, ...]


@dataclass(frozen=True)
class Finished:
    """Every choice of the request has finished."""

    prompt_tokens: int
    completion_tokens: int
    queued_s: float  # submitted -> admitted
    first_token_s: float  # submitted -> first token of any choice
    total_s: float  # submitted -> finished


@dataclass(frozen=True)
class Failed:
    message: str


Event = Chunk | PromptLogprobs | Finished | Failed


@dataclass(frozen=True)
class EngineStats:
    waiting_requests: int
    running_requests: int
    running_sequences: int
    max_batch: int


@dataclass
class Completion:
    """The collected result of one request (see Engine.complete)."""

    texts: list[str]
    finish_reasons: list[str]
    tokens: list[int]  # generated per choice
    prompt_tokens: int
    completion_tokens: int


def choice_seed(seed: int, index: int) -> int:
    """The generator seed of choice `index`: the request's seed itself for choice 0 (so a request
    with n=1 and seed s equals choice 0 of any request with seed s), a mixed one for the others."""
    seed %= SEED_MODULUS
    if index == 0:
        return seed
    return (seed * 6364136223846793005 + index * 1442695040888963407 + 1) % SEED_MODULUS


@dataclass(eq=False)
class _Job:
    id: int
    request: Request
    sink: Callable[[Event], None]
    seed: int
    submitted: float
    admitted: float = 0.0
    first_token: float = 0.0
    remaining: int = 0  # choices not finished yet
    completion_tokens: int = 0
    cancelled: bool = False
    done: bool = False


@dataclass(eq=False)
class _Sequence:
    job: _Job
    index: int  # choice index within the job
    row: int  # KV-cache row (== its place in Engine._live)
    position: int  # where next_token goes in the sequence
    generator: torch.Generator
    text: TextStream
    next_token: int = 0
    generated: int = 0
    finished: bool = False


class Handle:
    """A submitted request; cancel() stops it (from any thread) and frees its cache rows."""

    def __init__(self, engine: Engine, job: _Job):
        self._engine, self._job = engine, job

    @property
    def id(self) -> int:
        return self._job.id

    def cancel(self) -> None:
        self._engine._cancel(self._job)


class Engine:
    """Continuous-batching generation for one model. start() it, submit() from any thread, close()."""

    def __init__(self, model: Transformer, tokenizer: TextTokenizer, config: EngineConfig = EngineConfig()):
        config.validate()
        # NOTE: eval mode (train mode would add router losses and statistics), and each MoE layer
        # swapped in place for its inference form over the same weights (moelab.infer.moe_layer).
        self.model = prepare_for_inference(model)
        self.tokenizer = tokenizer
        self.config = config
        self.context = model.cfg.max_seq_len
        parameter = next(model.parameters())
        self.device = parameter.device
        # bf16 on CUDA (as in training), fp32 on CPU; the cache holds what attention computes in.
        self.autocast_dtype = (
            torch.bfloat16 if self.device.type == "cuda" and parameter.dtype == torch.float32 else None
        )
        self.cache_dtype = self.autocast_dtype or parameter.dtype
        self._pad_id = tokenizer.pad_id
        self._lock = threading.Condition()
        self._waiting: deque[_Job] = deque()  # guarded by _lock
        self._ids = itertools.count(1)
        self._closed = False
        self._thread: threading.Thread | None = None
        # Engine-thread state:
        self._live: list[_Sequence] = []  # _live[r] uses cache row r
        self._cache: KVCache | None = None

    # -- any thread ---------------------------------------------------------------------------

    def start(self) -> Engine:
        """Allocate the KV cache (here, so that running out of memory is the caller's error) and
        start the engine thread."""
        if self._thread is None:
            self._cache = KVCache(self.model.cfg, self.config.max_batch, self.context, self.device, self.cache_dtype)
            self._thread = threading.Thread(target=self._run, name="moelab-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread; requests still waiting or running receive Failed."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, request: Request, sink: Callable[[Event], None]) -> Handle:
        """Queue a request; raises QueueFull, EngineClosed, or ValueError for an impossible request."""
        self._check(request)
        seed = secrets.randbits(63) if request.seed is None else request.seed % SEED_MODULUS
        job = _Job(next(self._ids), request, sink, seed, time.perf_counter(), remaining=request.choices)
        with self._lock:
            if self._closed or self._thread is None:
                raise EngineClosed("the engine is not running")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are waiting already (max_queue {self.config.max_queue})"
                )
            self._waiting.append(job)
            self._lock.notify_all()
        return Handle(self, job)

    def stream(self, request: Request) -> Iterator[Event]:
        """Submit and iterate over the request's events until Finished or Failed; leaving the loop
        early cancels the request."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        handle = self.submit(request, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if isinstance(event, Finished | Failed):
                    return
        finally:
            handle.cancel()

    def complete(self, request: Request) -> Completion:
        """Submit and wait for the whole result; raises RuntimeError if the engine failed it."""
        texts = [[] for _ in range(request.choices)]
        reasons, tokens = [""] * request.choices, [0] * request.choices
        for event in self.stream(request):
            if isinstance(event, Failed):
                raise RuntimeError(event.message)
            if isinstance(event, Chunk):
                texts[event.index].append(event.text)
                tokens[event.index] = event.tokens
                reasons[event.index] = event.finish_reason or reasons[event.index]
            elif isinstance(event, Finished):
                return Completion(
                    ["".join(t) for t in texts], reasons, tokens, event.prompt_tokens, event.completion_tokens
                )
        raise AssertionError("unreachable: stream() ends with Finished or Failed")

    def stats(self) -> EngineStats:
        with self._lock:
            waiting = len(self._waiting)
        live = [s for s in list(self._live) if not s.finished]  # a copy: the engine thread changes it
        return EngineStats(waiting, len({id(s.job) for s in live}), len(live), self.config.max_batch)

    def _check(self, request: Request) -> None:
        if request.n < 1 or not request.prompts:
            raise ValueError("a request needs at least one prompt and n >= 1")
        if request.choices > self.config.max_batch:
            raise ValueError(
                f"{request.choices} choices (prompts x n) exceed the engine's batch of {self.config.max_batch}"
            )
        if request.max_tokens < 0:
            raise ValueError(f"max_tokens = {request.max_tokens} is not allowed: an integer >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            count = getattr(request, name)
            if count is not None and count < 0:
                raise ValueError(f"{name} = {count} is not allowed: None or an integer >= 0")
        request.params.validate()
        for prompt in request.prompts:
            if not prompt:
                raise ValueError("a prompt needs at least one token")
            if len(prompt) + request.max_tokens > self.context:
                raise ValueError(
                    f"{len(prompt)} prompt tokens + max_tokens {request.max_tokens} exceed the context window of {self.context}"
                )

    def _cancel(self, job: _Job) -> None:
        with self._lock:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)

    # -- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else contextlib.nullcontext()
        )
        try:
            with torch.inference_mode(), autocast:
                self._loop()
        except BaseException:  # a bug here must not leave submitters waiting forever
            log.exception("the engine thread stopped")
        finally:
            with self._lock:
                self._closed = True
                waiting, self._waiting = list(self._waiting), deque()
            self._fail({s.job for s in self._live} | set(waiting), "the engine was shut down")
            self._live.clear()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._live:
                    self._lock.wait()
                if self._closed:
                    return
                admitted = self._take_admissible()
            try:
                self._step(admitted)
            except Exception as exc:  # a broken step fails its requests, not the engine
                log.exception("engine step failed")
                self._fail(
                    {s.job for s in self._live} | set(admitted), f"generation failed: {type(exc).__name__}: {exc}"
                )
                self._live.clear()

    def _take_admissible(self) -> list[_Job]:
        """Pop waiting requests, first come first served, while rows are free and the padded
        prefill stays within budget (the first one always fits the budget)."""
        free = self.config.max_batch - len(self._live)
        taken: list[_Job] = []
        prompts, longest = 0, 0
        while self._waiting:
            job = self._waiting[0]
            request = job.request
            if request.choices > free:
                break  # NOTE: no overtaking, so a request with many choices is not starved
            new_longest = max(longest, max(len(p) for p in request.prompts))
            if taken and (prompts + len(request.prompts)) * new_longest > self.config.max_prefill_tokens:
                break
            self._waiting.popleft()
            taken.append(job)
            free -= request.choices
            prompts, longest = prompts + len(request.prompts), new_longest
        return taken

    def _step(self, admitted: list[_Job]) -> None:
        for seq in self._live:
            if seq.job.cancelled:
                seq.finished = True
        self._compact()
        if admitted:
            self._prefill(admitted)
            self._compact()
        if self._live:
            self._decode()
            self._compact()

    def _prefill(self, jobs: list[_Job]) -> None:
        """Run the prompts of newly admitted requests and sample each choice's first token."""
        now = time.perf_counter()
        new: list[_Sequence] = []
        prompts: list[tuple[int, ...]] = []
        prompt_of: list[int] = []  # for each new sequence, its prompt's index in `prompts`
        source_row: list[int] = []  # for each prompt, the row its prefill writes
        for job in jobs:
            job.admitted = now
            for p, prompt in enumerate(job.request.prompts):
                source_row.append(len(self._live) + len(new))
                prompts.append(prompt)
                for j in range(job.request.n):
                    index = p * job.request.n + j
                    generator = seeded_generator(choice_seed(job.seed, index))
                    row = len(self._live) + len(new)
                    new.append(
                        _Sequence(job, index, row, len(prompt), generator, TextStream(self.tokenizer, job.request.stop))
                    )
                    prompt_of.append(len(prompts) - 1)
        self._live.extend(new)  # admitted: counted as running, failed with the step if it fails
        lengths_P = torch.tensor([len(p) for p in prompts], device=self.device)
        longest = int(lengths_P.max())
        # NOTE: a shorter prompt's padding writes keys past its end; those rows' positions are
        # overwritten by the generated tokens before any query can see them.
        tokens_PT = torch.full((len(prompts), longest), self._pad_id, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens_PT[i, : len(prompt)] = torch.tensor(prompt)
        positions_PT = torch.arange(longest, device=self.device).expand(len(prompts), longest)
        rows_P = torch.tensor(source_row, device=self.device)
        logits_PTV = self.model(
            tokens_PT.to(self.device), positions_BT=positions_PT, cache=self._cache, rows_B=rows_P
        ).logits
        self._emit_prompt_logprobs(jobs, prompts, logits_PTV)
        last_PV = logits_PTV[torch.arange(len(prompts), device=self.device), lengths_P - 1]
        for seq, p in zip(new, prompt_of):
            if seq.job.request.max_tokens == 0:  # scored only: nothing to generate
                self._finish(seq)
            elif seq.row != source_row[p]:  # another choice of the same prompt: share its keys
                self._copy_row(source_row[p], seq.row, len(prompts[p]))
        sampled = [i for i, seq in enumerate(new) if not seq.finished]
        if sampled:
            index = torch.tensor([prompt_of[i] for i in sampled], device=self.device)
            self._sample_and_emit([new[i] for i in sampled], last_PV.index_select(0, index))

    def _emit_prompt_logprobs(self, jobs: list[_Job], prompts: list[tuple[int, ...]], logits_PTV) -> None:
        """PromptLogprobs for each prompt of the jobs that asked (prompts in the order of `jobs`)."""
        first = 0
        for job in jobs:
            request = job.request
            if request.prompt_logprobs is not None:
                for p, prompt in enumerate(request.prompts):
                    # position t-1 predicts token t: rows 0..L-2 score tokens 1..L-1
                    scored = _token_logprobs(
                        logits_PTV[first + p, : len(prompt) - 1], prompt[1:], request.prompt_logprobs
                    )
                    self._emit(job, PromptLogprobs(p, (None, *scored)))
            first += len(request.prompts)

    def _decode(self) -> None:
        live = self._live
        tokens_B1 = torch.tensor([[s.next_token] for s in live], device=self.device)
        positions_B1 = torch.tensor([[s.position] for s in live], device=self.device)
        # rows_B=None: the live sequences are exactly cache rows 0..B-1
        logits_BV = self.model(tokens_B1, positions_BT=positions_B1, cache=self._cache).logits[:, -1]
        for seq in live:
            seq.position += 1
        self._sample_and_emit(live, logits_BV)

    def _sample_and_emit(self, seqs: Sequence[_Sequence], logits_BV: torch.Tensor) -> None:
        params = [s.job.request.params for s in seqs]
        uniform = [0.0 if p.greedy else draw_uniform(s.generator) for s, p in zip(seqs, params)]
        tokens = sample_rows(logits_BV, params, uniform)
        scored = [i for i, s in enumerate(seqs) if s.job.request.logprobs is not None and not s.job.done]
        logprobs: dict[int, TokenLogprob] = {}
        if scored:
            rows_S = torch.tensor(scored, device=logits_BV.device)
            top = max(seqs[i].job.request.logprobs for i in scored)
            found = _token_logprobs(logits_BV.index_select(0, rows_S), [tokens[i] for i in scored], top)
            for i, entry in zip(scored, found):
                n = seqs[i].job.request.logprobs
                logprobs[i] = entry if n == top else TokenLogprob(entry.token, entry.logprob, entry.top[:n])
        now = time.perf_counter()
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if not seq.job.done:
                self._accept(seq, token, now, logprobs.get(i))

    def _accept(self, seq: _Sequence, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        job, request = seq.job, seq.job.request
        seq.generated += 1
        seq.next_token = token
        if not job.first_token:
            job.first_token = now
        finish = None
        if token in request.stop_token_ids:
            text, finish = seq.text.flush(), "stop"
        else:
            text = seq.text.push(token)
            if seq.text.stopped:
                finish = "stop"
            elif seq.generated >= request.max_tokens:
                text += seq.text.flush()
                finish = "stop" if seq.text.stopped else "length"
        self._emit(job, Chunk(seq.index, text, seq.generated, finish, now, token, logprob))
        if finish is not None:
            self._finish(seq)

    def _finish(self, seq: _Sequence) -> None:
        """The choice is over; the request too when it was its last choice."""
        job = seq.job
        seq.finished = True
        job.remaining -= 1
        job.completion_tokens += seq.generated
        if job.remaining == 0 and not job.done:
            job.done = True
            end = time.perf_counter()
            first_token = job.first_token or end  # a request that scores its prompt only
            self._emit(
                job,
                Finished(
                    job.request.prompt_tokens,
                    job.completion_tokens,
                    job.admitted - job.submitted,
                    first_token - job.submitted,
                    end - job.submitted,
                ),
            )

    def _emit(self, job: _Job, event: Event) -> None:
        if job.cancelled:
            return
        try:
            job.sink(event)
        except Exception:  # the consumer is gone; stop spending compute on it
            log.exception("request %d: its event sink failed; cancelling it", job.id)
            job.cancelled = True

    def _fail(self, jobs: set[_Job], message: str) -> None:
        for job in jobs:
            if not job.done:
                job.done = True
                self._emit(job, Failed(message))

    def _compact(self) -> None:
        """Free the rows of finished sequences, moving the last live rows into the holes so that
        the live sequences stay in rows 0..B-1."""
        if not any(s.finished for s in self._live):
            return
        alive = [s for s in self._live if not s.finished]
        keep = len(alive)
        holes = iter(r for r, s in enumerate(self._live[:keep]) if s.finished)
        for seq in alive:
            if seq.row >= keep:
                hole = next(holes)
                self._copy_row(seq.row, hole, seq.position)
                seq.row = hole
        self._live = sorted(alive, key=lambda s: s.row)

    def _copy_row(self, src: int, dst: int, length: int) -> None:
        """Cache keys and values of positions [0, length) from row src to row dst."""
        cache = self._cache
        cache.k[:, dst, :, :length] = cache.k[:, src, :, :length]
        cache.v[:, dst, :, :length] = cache.v[:, src, :, :length]


def _token_logprobs(logits_TV: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """For row t of the logits: the log-probability of tokens[t] and the `top` most likely tokens,
    from the raw distribution in float32."""
    if not len(tokens):
        return []
    # NOTE: float32 whatever the forward computed in (bf16 under autocast): log_softmax of bf16
    # logits would round every log-probability to 3 significant digits.
    logprobs_TV = torch.log_softmax(logits_TV.float(), dim=-1)
    tokens_T = torch.tensor(list(tokens), device=logprobs_TV.device)
    chosen = logprobs_TV.gather(1, tokens_T[:, None]).squeeze(1).tolist()
    top = min(top, logprobs_TV.shape[-1])
    if top:
        values_TN, ids_TN = logprobs_TV.topk(top, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids_TN.tolist(), values_TN.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(tokens, chosen, tops)]
