"""The batching engine against the single-request reference `generate()`: the same text for every
request however they are batched, queued, joined mid-decode or cancelled."""

from __future__ import annotations

import queue
import threading

import pytest

from moelab.infer.engine import (
    Chunk,
    Engine,
    EngineConfig,
    Failed,
    Finished,
    QueueFull,
    Request,
    choice_seed,
)
from moelab.infer.generate import generate
from moelab.infer.sampling import SamplingParams
from tests.infer.helpers import StepGate, wait_for

GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=1.0)
NUCLEUS = SamplingParams(temperature=0.8, top_p=0.9, top_k=20)


def request(tokenizer, prompt: str, max_tokens: int, params=SAMPLED, **kwargs) -> Request:
    return Request(
        (tuple(tokenizer.encode(prompt)),), max_tokens, params, stop_token_ids=frozenset({tokenizer.eos_id}), **kwargs
    )


def reference(tiny, prompt: str, max_tokens: int, params=SAMPLED, seed: int | None = None, **kwargs) -> str:
    return generate(tiny.model, tiny.tokenizer, prompt, max_tokens, params, seed=seed, **kwargs)


class Collector:
    """A sink that keeps every event, for requests submitted without a thread each."""

    def __init__(self):
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self._chunks: list[Chunk] = []
        self._end = None

    def __call__(self, event) -> None:
        self.events.put(event)

    def drain(self) -> None:
        while not self.events.empty():
            event = self.events.get()
            if isinstance(event, Chunk):
                self._chunks.append(event)
            else:
                self._end = event

    @property
    def chunks(self) -> list[Chunk]:
        self.drain()
        return self._chunks

    @property
    def end(self):
        self.drain()
        return self._end

    def text(self, index: int = 0) -> str:
        self.drain()
        return "".join(c.text for c in self.chunks if c.index == index)

    def done(self) -> bool:
        self.drain()
        return self.end is not None


def test_batched_queued_requests_equal_single_request_generation(tiny) -> None:
    """Eight requests of different lengths, settings and budgets through four cache rows: some wait
    in the queue, rows are freed and refilled in the middle of others' decoding."""
    prompts = [
        "def ",
        "import os\n",
        "class A:\n    ",
        "x",
        "return self.",
        "for i in range(",
        "# comment\n",
        "if __name__",
    ]
    cases = [(p, 4 + 5 * (i % 4), [SAMPLED, GREEDY, NUCLEUS][i % 3], 100 + i) for i, p in enumerate(prompts)]
    with Engine(tiny.model, tiny.tokenizer, EngineConfig(max_batch=4, max_prefill_tokens=16)) as engine:
        sinks = [Collector() for _ in cases]
        for (prompt, budget, params, seed), sink in zip(cases, sinks):
            engine.submit(request(tiny.tokenizer, prompt, budget, params, seed=seed), sink)
        wait_for(lambda: all(s.done() for s in sinks), what="all requests")
        assert engine.stats().running_sequences == 0
    for (prompt, budget, params, seed), sink in zip(cases, sinks):
        assert isinstance(sink.end, Finished)
        assert sink.text() == reference(tiny, prompt, budget, params, seed), prompt
        assert sink.chunks[-1].tokens == sink.end.completion_tokens <= budget
        assert sink.end.prompt_tokens == len(tiny.tokenizer.encode(prompt))


def test_a_request_joins_the_running_batch_at_the_next_step(tiny) -> None:
    gate = StepGate(tiny.model)
    with Engine(gate, tiny.tokenizer, EngineConfig(max_batch=4)) as engine:
        first, second = Collector(), Collector()
        engine.submit(request(tiny.tokenizer, "def ", 30, seed=1), first)
        gate.release(3)  # step 1: prefill and a decode; step 2: a decode
        wait_for(lambda: len(first.chunks) == 3 and gate.waiting == 1, what="step 3 to be under way")
        engine.submit(request(tiny.tokenizer, "import ", 10, seed=2), second)
        gate.release(1)  # step 3 ends (it had admitted nobody)
        wait_for(lambda: len(first.chunks) == 4 and gate.waiting == 1, what="step 4 to be under way")
        assert len(second.chunks) == 0
        gate.release(2)  # step 4: the newcomer's prefill, then one decode for both
        wait_for(lambda: len(second.chunks) == 2 and len(first.chunks) == 5 and gate.waiting == 1, what="step 4 to end")
        assert first.chunks[-1].finish_reason is None  # the first request was running all along
        gate.open()
        wait_for(lambda: first.done() and second.done(), what="both requests")
    assert first.text() == reference(tiny, "def ", 30, seed=1)
    assert second.text() == reference(tiny, "import ", 10, seed=2)


def test_choices_of_one_prompt_follow_their_own_seeds(tiny) -> None:
    with Engine(tiny.model, tiny.tokenizer, EngineConfig(max_batch=4)) as engine:
        result = engine.complete(request(tiny.tokenizer, "def f(", 12, n=3, seed=5))
        single = engine.complete(request(tiny.tokenizer, "def f(", 12, seed=5))
        unseeded = [engine.complete(request(tiny.tokenizer, "def f(", 12)).texts[0] for _ in range(2)]
    expected = [reference(tiny, "def f(", 12, seed=choice_seed(5, j)) for j in range(3)]
    assert result.texts == expected
    assert single.texts[0] == expected[0]  # choice 0 of seed s is the n=1 result of seed s
    assert len(set(result.texts)) == 3 and unseeded[0] != unseeded[1]
    assert result.prompt_tokens == len(tiny.tokenizer.encode("def f("))
    assert result.completion_tokens == sum(result.tokens)


def test_several_prompts_in_one_request(tiny) -> None:
    prompts = ["a = ", "b = [", "while "]
    job = Request(
        tuple(tuple(tiny.tokenizer.encode(p)) for p in prompts),
        8,
        GREEDY,
        n=2,
        stop_token_ids=frozenset({tiny.tokenizer.eos_id}),
    )
    with Engine(tiny.model, tiny.tokenizer, EngineConfig(max_batch=6)) as engine:
        result = engine.complete(job)
    for p, prompt in enumerate(prompts):
        expected = reference(tiny, prompt, 8, GREEDY)
        assert result.texts[2 * p] == result.texts[2 * p + 1] == expected
    assert result.prompt_tokens == sum(len(tiny.tokenizer.encode(p)) for p in prompts)


def test_finish_reasons_stop_strings_and_stop_tokens(tiny) -> None:
    full = reference(tiny, "def ", 40, seed=3, stop_at_eos=False)
    assert len(full) > 12
    stop = full[8:10]
    cut = full[: full.index(stop)]
    stop_byte = full[6].encode()[0]  # the byte tokenizer: token id = byte value
    with Engine(tiny.model, tiny.tokenizer, EngineConfig(max_batch=2)) as engine:
        by_string = engine.complete(Request((tuple(tiny.tokenizer.encode("def ")),), 40, SAMPLED, seed=3, stop=(stop,)))
        by_token = engine.complete(
            Request((tuple(tiny.tokenizer.encode("def ")),), 40, SAMPLED, seed=3, stop_token_ids=frozenset({stop_byte}))
        )
        by_length = engine.complete(Request((tuple(tiny.tokenizer.encode("def ")),), 5, SAMPLED, seed=3))
    assert (by_string.texts[0], by_string.finish_reasons[0]) == (cut, "stop")
    assert (by_token.texts[0], by_token.finish_reasons[0]) == (full[: full.index(full[6])], "stop")
    assert by_token.tokens[0] == full.index(full[6]) + 1  # the stop token counts as generated
    assert (by_length.texts[0], by_length.finish_reasons[0], by_length.tokens[0]) == (full[:5], "length", 5)


def test_cancel_frees_the_row_for_the_next_request(tiny) -> None:
    gate = StepGate(tiny.model)
    with Engine(gate, tiny.tokenizer, EngineConfig(max_batch=1)) as engine:
        long, short = Collector(), Collector()
        handle = engine.submit(request(tiny.tokenizer, "x", 50, seed=1), long)
        engine.submit(request(tiny.tokenizer, "y", 3, seed=2), short)
        gate.release(2)
        wait_for(lambda: len(long.chunks) == 2, what="two tokens")
        assert engine.stats().waiting_requests == 1  # the short one waits for the only row
        handle.cancel()
        gate.open()
        wait_for(short.done, what="the waiting request")
        assert engine.stats().running_sequences == 0
    assert gate.calls <= 3 + 3  # the cancelled request stopped within a step, not after 50 tokens
    assert len(long.chunks) <= 3 and long.end is None
    assert short.text() == reference(tiny, "y", 3, seed=2)


def test_cancelling_a_waiting_request_removes_it(tiny) -> None:
    gate = StepGate(tiny.model)
    with Engine(gate, tiny.tokenizer, EngineConfig(max_batch=1, max_queue=1)) as engine:
        engine.submit(request(tiny.tokenizer, "a", 5), Collector())
        wait_for(lambda: engine.stats().running_sequences == 1, what="the first request to start")
        waiting = engine.submit(request(tiny.tokenizer, "b", 5), Collector())
        with pytest.raises(QueueFull):
            engine.submit(request(tiny.tokenizer, "c", 5), Collector())
        waiting.cancel()
        assert engine.stats().waiting_requests == 0
        engine.submit(request(tiny.tokenizer, "d", 5), Collector())  # the queue has room again
        gate.open()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny) -> None:
    gate = StepGate(tiny.model)
    gate.open()
    with Engine(gate, tiny.tokenizer, EngineConfig(max_batch=2)) as engine:
        gate.fail_next = True
        events = list(engine.stream(request(tiny.tokenizer, "def ", 5, seed=1)))
        assert isinstance(events[-1], Failed) and "injected failure" in events[-1].message
        assert engine.complete(request(tiny.tokenizer, "def ", 5, seed=1)).texts[0] == reference(
            tiny, "def ", 5, seed=1
        )


def test_impossible_requests_are_refused(tiny) -> None:
    with Engine(tiny.model, tiny.tokenizer, EngineConfig(max_batch=2)) as engine:
        context = engine.context
        with pytest.raises(ValueError, match="context window"):
            engine.submit(Request(((1,) * 10,), context - 9, SAMPLED), Collector())
        with pytest.raises(ValueError, match="batch"):
            engine.submit(Request(((1,),), 4, SAMPLED, n=3), Collector())
        with pytest.raises(ValueError, match="at least one token"):
            engine.submit(Request(((),), 4, SAMPLED), Collector())
        assert engine.complete(Request(((1,) * 10,), context - 10, GREEDY)).tokens[0] <= context - 10


def test_many_threads_submitting_at_once(tiny) -> None:
    """The engine is called from many threads; each gets its own answer."""
    prompts = [f"v{i} = " for i in range(12)]
    results: dict[int, str] = {}
    with Engine(tiny.model, tiny.tokenizer, EngineConfig(max_batch=8)) as engine:

        def client(i: int) -> None:
            results[i] = engine.complete(request(tiny.tokenizer, prompts[i], 6, seed=i)).texts[0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == {i: reference(tiny, prompts[i], 6, seed=i) for i in range(12)}
