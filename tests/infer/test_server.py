"""The HTTP server, started for real on a free localhost port and called with the official
`openai` client (and httpx for what the client will not send). Answers are checked against the
single-request `generate()` reference."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from moelab.data.tokenizer import IM_END
from moelab.infer.chat import render_chat
from moelab.infer.engine import EngineConfig, choice_seed
from moelab.infer.generate import generate
from moelab.infer.http_transport import BackgroundServer
from moelab.infer.sampling import SamplingParams
from moelab.infer.server import Servable
from tests.infer.helpers import MODEL, StepGate, client, ready, start, wait_for

GREEDY = SamplingParams(temperature=0)


def metric(server: BackgroundServer, name: str, headers=None) -> float:
    """The value of one unlabelled sample in /metrics."""
    for line in httpx.get(server.url + "/metrics", headers=headers).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def complete_ref(tiny, prompt: str, max_tokens: int, params=GREEDY, seed=None) -> str:
    return generate(tiny.model, tiny.tokenizer, prompt, max_tokens, params, seed=seed)


def chat_ref(tiny, messages, max_tokens: int, params=GREEDY, seed=None) -> str:
    im_end = tiny.tokenizer.token_id(IM_END)
    return generate(
        tiny.model, tiny.tokenizer, render_chat(messages), max_tokens, params, seed=seed, stop_token_ids={im_end}
    )


def streamed_text(stream, chat: bool, choices: int = 1) -> tuple[list[str], list[str | None], object]:
    texts, reasons, usage = [""] * choices, [None] * choices, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if chat else choice.text
            texts[choice.index] += piece or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    return texts, reasons, usage


MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a loop"}]


def test_models_and_health(server, api) -> None:
    assert [m.id for m in api.models.list().data] == [MODEL]
    assert api.models.retrieve(MODEL).created == 123
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": MODEL}


def test_completion_streaming_equals_non_streaming_and_the_reference(server, api, tiny) -> None:
    whole = api.completions.create(model=MODEL, prompt="def ", max_tokens=12, temperature=0)
    stream = api.completions.create(
        model=MODEL, prompt="def ", max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    texts, reasons, usage = streamed_text(stream, chat=False)
    assert whole.choices[0].text == texts[0] == complete_ref(tiny, "def ", 12)
    assert whole.choices[0].finish_reason == reasons[0]
    assert whole.usage == usage
    assert whole.usage.prompt_tokens == len(tiny.tokenizer.encode("def "))
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_chat_streaming_equals_non_streaming_and_the_reference(server, api, tiny) -> None:
    whole = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    stream = api.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, reasons, usage = streamed_text(stream, chat=True)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == texts[0] == chat_ref(tiny, MESSAGES, 10)
    assert whole.choices[0].finish_reason == reasons[0] == ("length" if whole.usage.completion_tokens == 10 else "stop")
    assert whole.usage == usage
    assert whole.usage.prompt_tokens == len(tiny.tokenizer.encode(render_chat(MESSAGES)))


def test_the_stream_is_server_sent_events_ending_with_done(server) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
    }


def test_same_seed_same_text_and_n_indexed_choices(server, api, tiny) -> None:
    params = SamplingParams(temperature=1.0)
    kwargs = dict(model=MODEL, prompt="import ", max_tokens=8, temperature=1.0, seed=42)
    a, b = api.completions.create(**kwargs), api.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text == complete_ref(tiny, "import ", 8, params, seed=42)
    three = api.completions.create(**kwargs, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.text for c in three.choices] == [
        complete_ref(tiny, "import ", 8, params, seed=choice_seed(42, j)) for j in range(3)
    ]
    assert three.usage.completion_tokens == 3 * 8 and all(c.finish_reason == "length" for c in three.choices)
    assert three.usage.prompt_tokens == a.usage.prompt_tokens
    chat = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=9, n=3)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert chat.choices[0].message.content == chat_ref(tiny, MESSAGES, 6, params, seed=9)
    streamed, _, usage = streamed_text(
        api.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=6,
            temperature=1.0,
            seed=9,
            n=3,
            stream=True,
            stream_options={"include_usage": True},
        ),
        chat=True,
        choices=3,
    )
    assert streamed == [c.message.content for c in chat.choices]
    assert usage == chat.usage


def test_stop_strings_finish_with_stop(server, api, tiny) -> None:
    params = SamplingParams(temperature=1.0)
    full = complete_ref(tiny, "def ", 30, params, seed=3)
    stop = full[6:8]
    result = api.completions.create(
        model=MODEL, prompt="def ", max_tokens=30, temperature=1.0, seed=3, stop=[stop, "never-appears"]
    )
    assert result.choices[0].text == full[: full.index(stop)]
    assert result.choices[0].finish_reason == "stop"


def test_prompts_as_token_ids_and_lists(server, api, tiny) -> None:
    ids = tiny.tokenizer.encode("def ")
    by_ids = api.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    by_text = api.completions.create(model=MODEL, prompt=["def ", "x = "], max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text == complete_ref(tiny, "def ", 5)
    assert by_text.choices[1].text == complete_ref(tiny, "x = ", 5)
    assert by_text.usage.prompt_tokens == len(ids) + len(tiny.tokenizer.encode("x = "))


def test_sixteen_concurrent_clients_get_their_own_answers(server, tiny) -> None:
    prompts = [f"def f{i}(" for i in range(16)]
    expected = [complete_ref(tiny, p, 8) for p in prompts]

    def ask(i: int) -> str:
        api = client(server)
        if i % 2:
            return api.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0).choices[0].text
        return streamed_text(
            api.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0, stream=True), chat=False
        )[0][0]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == expected


GOOD = {"model": MODEL, "prompt": "x", "max_tokens": 1}
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
C, CC = "/v1/completions", "/v1/chat/completions"
MALFORMED = [
    # (name, path, body (bytes = sent raw), status, param, code)
    ("not json", C, b"{", 400, None, "invalid_json"),
    ("not utf-8", C, b"\xff\xfe{", 400, None, "invalid_json"),
    ("not an object", CC, b"[]", 400, None, None),
    ("no model", C, {"prompt": "x"}, 400, "model", None),
    ("unknown model", CC, {**GOOD_CHAT, "model": "gpt-7"}, 404, "model", "model_not_found"),
    ("unknown argument", C, {**GOOD, "temprature": 1}, 400, "temprature", "unrecognized_argument"),
    ("no prompt", C, {"model": MODEL}, 400, "prompt", None),
    ("prompt of wrong type", C, {**GOOD, "prompt": {"text": "x"}}, 400, "prompt", None),
    ("token id outside the vocabulary", C, {**GOOD, "prompt": [1, 10**6]}, 400, "prompt", None),
    ("no messages", CC, {"model": MODEL}, 400, "messages", None),
    ("empty messages", CC, {**GOOD_CHAT, "messages": []}, 400, "messages", None),
    ("message not an object", CC, {**GOOD_CHAT, "messages": ["hi"]}, 400, "messages[0]", None),
    (
        "unknown role",
        CC,
        {**GOOD_CHAT, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0].role",
        None,
    ),
    ("no content", CC, {**GOOD_CHAT, "messages": [{"role": "user"}]}, 400, "messages[0].content", None),
    (
        "image content",
        CC,
        {**GOOD_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content[0]",
        None,
    ),
    (
        "tool calls",
        CC,
        {**GOOD_CHAT, "messages": [{"role": "assistant", "content": "x", "tool_calls": []}]},
        400,
        "messages[0].tool_calls",
        "unsupported_parameter",
    ),
    ("negative temperature", C, {**GOOD, "temperature": -1}, 400, "temperature", None),
    ("temperature a string", CC, {**GOOD_CHAT, "temperature": "hot"}, 400, "temperature", None),
    ("top_p zero", C, {**GOOD, "top_p": 0}, 400, "top_p", None),
    ("top_k below -1", C, {**GOOD, "top_k": -2}, 400, "top_k", None),
    ("n zero", C, {**GOOD, "n": 0}, 400, "n", None),
    ("n above the batch", CC, {**GOOD_CHAT, "n": 17}, 400, "n", None),
    ("max_tokens zero", C, {**GOOD, "max_tokens": 0}, 400, "max_tokens", None),
    ("max_tokens a float", C, {**GOOD, "max_tokens": 2.5}, 400, "max_tokens", None),
    ("max_tokens true", C, {**GOOD, "max_tokens": True}, 400, "max_tokens", None),
    ("stop not strings", C, {**GOOD, "stop": [1, 2]}, 400, "stop", None),
    ("stop empty string", C, {**GOOD, "stop": ""}, 400, "stop", None),
    ("seed a string", C, {**GOOD, "seed": "lucky"}, 400, "seed", None),
    ("stream not boolean", C, {**GOOD, "stream": "yes"}, 400, "stream", None),
    (
        "stream_options without stream",
        C,
        {**GOOD, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        None,
    ),
    ("logprobs not boolean", CC, {**GOOD_CHAT, "logprobs": "yes"}, 400, "logprobs", None),
    ("penalty", C, {**GOOD, "frequency_penalty": 0.5}, 400, "frequency_penalty", "unsupported_parameter"),
    (
        "prompt plus max_tokens over the context",
        C,
        {**GOOD, "prompt": "x" * 40, "max_tokens": 30},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "prompt alone over the context",
        CC,
        {**GOOD_CHAT, "max_tokens": None, "messages": [{"role": "user", "content": "x" * 80}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
]


@pytest.mark.parametrize("name, path, body, status, param, code", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_openai_errors_and_the_server_goes_on(
    server, api, name, path, body, status, param, code
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    if code == "context_length_exceeded" and param == "max_tokens":
        assert "64" in error["message"] and "70" in error["message"]  # the window and what was asked
    good = api.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0)
    assert good.usage.completion_tokens + good.usage.prompt_tokens == good.usage.total_tokens


def test_errors_the_client_raises_on(server, api) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        api.chat.completions.create(model="nope", messages=MESSAGES)
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        api.completions.create(model=MODEL, prompt="x" * 60, max_tokens=10)
    assert exc.value.body["code"] == "context_length_exceeded"
    missing = httpx.get(server.url + "/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + C).status_code == 405


def test_body_too_large_is_413(tiny_servable) -> None:
    srv = start(lambda: tiny_servable, max_body_bytes=2048)
    try:
        ready(srv)
        big = json.dumps({**GOOD, "prompt": "x" * 4096}).encode()
        declared = httpx.post(srv.url + C, content=big, headers={"content-type": "application/json"})
        chunked = httpx.post(
            srv.url + C, content=iter([big[:1500], big[1500:]]), headers={"content-type": "application/json"}
        )
        for response in (declared, chunked):
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "request_too_large"
        assert client(srv).completions.create(**GOOD).usage.completion_tokens == 1
    finally:
        srv.stop()


def test_api_key_is_required_except_for_health(tiny_servable) -> None:
    srv = start(lambda: tiny_servable, api_key="s3cret")
    try:
        ready(srv)
        for key in ("wrong", "s3cre", "s3cret-but-longer"):
            with pytest.raises(openai.AuthenticationError) as exc:
                client(srv, key).models.list()
            assert exc.value.body["code"] == "invalid_api_key"
        unauthenticated = httpx.post(srv.url + C, json=GOOD)
        assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["code"] == "missing_api_key"
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200
        assert client(srv, "s3cret").completions.create(**GOOD).choices[0].finish_reason in ("length", "stop")
    finally:
        srv.stop()


def test_health_is_503_while_loading_then_200(tiny_servable) -> None:
    release = threading.Event()

    def slow_load() -> Servable:
        release.wait(60)
        return tiny_servable

    srv = start(slow_load)
    try:
        health = httpx.get(srv.url + "/health")
        assert (health.status_code, health.json()["status"]) == (503, "loading")
        with pytest.raises(openai.InternalServerError) as exc:
            client(srv).completions.create(**GOOD)
        assert exc.value.status_code == 503 and exc.value.body["code"] == "model_loading"
        assert metric(srv, "moelab_model_loaded") == 0
        release.set()
        ready(srv)
        assert client(srv).completions.create(**GOOD).usage.completion_tokens == 1
        assert metric(srv, "moelab_model_loaded") == 1
    finally:
        srv.stop()


def test_a_failed_load_is_reported(tiny_servable) -> None:
    def broken() -> Servable:
        raise RuntimeError("checkpoint damaged")

    srv = start(broken)
    try:
        wait_for(lambda: httpx.get(srv.url + "/health").json()["status"] == "failed", what="the load to fail")
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and "checkpoint damaged" in health.json()["error"]
        response = httpx.post(srv.url + C, json=GOOD)
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_load_failed"
    finally:
        srv.stop()


@pytest.fixture()
def gated(tiny):
    """A server whose model runs one forward pass per permit: one cache row, one queue place."""
    gate = StepGate(tiny.model)
    srv = start(lambda: Servable(gate, tiny.tokenizer), engine=EngineConfig(max_batch=1, max_queue=1))
    ready(srv)
    yield srv, gate
    gate.open()
    srv.stop()


def test_queue_full_is_429_and_the_queued_requests_still_finish(gated, tiny) -> None:
    srv, gate = gated
    results = {}

    def ask(name: str, prompt: str) -> None:
        results[name] = (
            client(srv).completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0).choices[0].text
        )

    first = threading.Thread(target=ask, args=("first", "def "))
    first.start()
    wait_for(lambda: metric(srv, "moelab_running_sequences") == 1, what="the first request to take the row")
    second = threading.Thread(target=ask, args=("second", "x = "))
    second.start()
    wait_for(lambda: metric(srv, "moelab_queue_depth") == 1, what="the second request to queue")
    with pytest.raises(openai.RateLimitError) as exc:
        client(srv).completions.create(**GOOD)
    assert exc.value.body["code"] == "queue_full"
    gate.open()
    first.join(60)
    second.join(60)
    assert results == {"first": complete_ref(tiny, "def ", 4), "second": complete_ref(tiny, "x = ", 4)}
    assert metric(srv, "moelab_rejected_requests_total") == 1


def test_a_client_that_disconnects_mid_stream_frees_its_row(gated, tiny) -> None:
    srv, gate = gated
    body = {"model": MODEL, "prompt": "def ", "max_tokens": 50, "temperature": 0, "stream": True}
    gate.release(2)  # prefill and one decode step: two tokens, then the engine waits
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", srv.url + C, json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
        # leaving both blocks closes the connection mid-stream
    wait_for(lambda: metric(srv, "moelab_cancelled_requests_total") == 1, what="the server to notice")
    gate.open()
    wait_for(lambda: metric(srv, "moelab_running_sequences") == 0, what="the row to be freed")
    assert gate.calls <= 3  # the request stopped within a step of the disconnect, not after 50 tokens
    result = client(srv).completions.create(model=MODEL, prompt="x = ", max_tokens=4, temperature=0)
    assert result.choices[0].text == complete_ref(tiny, "x = ", 4)


def test_metrics_count_requests_tokens_and_latency(server, api) -> None:
    before = metric(server, "moelab_generation_tokens_total")
    prompt_before = metric(server, "moelab_prompt_tokens_total")
    result = api.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    assert metric(server, "moelab_generation_tokens_total") - before == result.usage.completion_tokens
    assert metric(server, "moelab_prompt_tokens_total") - prompt_before == result.usage.prompt_tokens
    for name in (
        'moelab_requests_total{endpoint="/v1/completions",status="200"}',
        'moelab_requests_total{endpoint="/v1/completions",status="400"}',
        "moelab_time_to_first_token_seconds_bucket",
        "moelab_time_per_output_token_seconds_bucket",
        'moelab_request_latency_seconds_count{endpoint="/v1/completions"}',
        "moelab_queue_depth 0.0",
    ):
        assert name in text, name


def test_a_client_that_gives_up_on_a_whole_response_frees_its_row(gated, tiny) -> None:
    srv, gate = gated
    gate.release(1)  # the prefill; then the engine waits, so the response cannot be complete
    body = {"model": MODEL, "prompt": "def ", "max_tokens": 50, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client stops waiting and closes the connection
        httpx.post(srv.url + C, json=body, timeout=httpx.Timeout(60, read=0.5))
    wait_for(lambda: metric(srv, "moelab_cancelled_requests_total") == 1, what="the server to notice")
    gate.open()
    wait_for(lambda: metric(srv, "moelab_running_sequences") == 0, what="the row to be freed")
    assert gate.calls <= 3
    assert client(srv).completions.create(model=MODEL, prompt="x = ", max_tokens=4, temperature=0).choices[
        0
    ].text == complete_ref(tiny, "x = ", 4)


def test_a_failed_generation_is_an_error_and_the_server_goes_on(gated, tiny) -> None:
    srv, gate = gated
    gate.open()
    gate.fail_next = True
    with pytest.raises(openai.InternalServerError) as exc:
        client(srv).completions.create(model=MODEL, prompt="def ", max_tokens=4)
    assert exc.value.status_code == 500 and "injected failure" in exc.value.body["message"]
    gate.fail_next = True
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", srv.url + CC, json=body, timeout=60) as response:
        events = [line for line in response.iter_lines() if line]
    assert json.loads(events[-2][6:])["error"]["code"] == "generation_failed" and events[-1] == "data: [DONE]"
    assert client(srv).completions.create(model=MODEL, prompt="def ", max_tokens=4, temperature=0).choices[
        0
    ].text == complete_ref(tiny, "def ", 4)


def test_a_tokenizer_without_chat_tokens_serves_completions_only(tiny) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from moelab.data.tokenizer import EOS, TextTokenizer, bytes_to_unicode

    raw = Tokenizer(models.BPE(vocab={c: b for b, c in bytes_to_unicode().items()}, merges=[]))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.add_special_tokens([EOS])
    plain = TextTokenizer(raw, eos_token=EOS, pad_token=None)  # like an imported model's
    srv = start(lambda: Servable(tiny.model, plain))
    try:
        ready(srv)
        assert client(srv).completions.create(**GOOD).usage.completion_tokens == 1
        response = httpx.post(srv.url + CC, json=GOOD_CHAT)
        assert response.status_code == 400 and response.json()["error"]["code"] == "chat_not_supported"
    finally:
        srv.stop()
