"""Log-probabilities, echo, max_tokens=0, /tokenize and /detokenize, on the real server with the
real `openai` client, lm-evaluation-harness's own request and parser, and httpx. Every value
is compared to a forward of the model run here on the same token ids."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import httpx
import pytest
import torch

from moelab.infer.chat import ChatEncoder
from moelab.infer.http_transport import BackgroundServer
from tests.infer.helpers import MODEL

C, CC = "/v1/completions", "/v1/chat/completions"


def reference_logprobs(tiny, ids: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward over `ids`, float32: row t scores the token after t."""
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def post(server: BackgroundServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_echo_scores_the_prompt_as_a_full_forward(server, tiny) -> None:
    ids = tiny.tokenizer.encode("def add(a, b):\n    return a + b\n")
    answer = post(server, C, {"model": MODEL, "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 3})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["text"] == tiny.tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert answer.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    ref = reference_logprobs(tiny, ids)
    for t in range(1, len(ids)):
        assert abs(lp["token_logprobs"][t] - ref[t - 1, ids[t]].item()) < 1e-5
        best = ref[t - 1].topk(3)
        top = lp["top_logprobs"][t]
        for token_id, value in zip(best.indices.tolist(), best.values.tolist()):
            assert abs(top[tiny.tokenizer.decode([token_id], skip_special=False)] - value) < 1e-5
        assert len(top) in (3, 4)  # the three most likely, and the prompt's token if it is not among them
    assert "".join(lp["tokens"]) == tiny.tokenizer.decode(ids)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]


def test_generated_logprobs_at_temperature_zero_equal_the_forward(server, api, tiny) -> None:
    prompt = "import os\nimport "
    out = api.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=5)
    choice = out.choices[0]
    ids, generated = tiny.tokenizer.encode(prompt), []
    assert len(choice.logprobs.tokens) == out.usage.completion_tokens
    # the generated ids, token by token: greedy, so each is the argmax of the reference
    for t, (token, value, top) in enumerate(
        zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs)
    ):
        ref = reference_logprobs(tiny, ids)[-1]
        best = ref.topk(5)
        chosen = int(best.indices[0])
        assert tiny.tokenizer.decode([chosen], skip_special=False) == token
        assert abs(value - best.values[0].item()) < 1e-4
        assert len(top) == 5 and max(top.values()) == value
        expected = sorted(best.values.tolist(), reverse=True)
        assert all(abs(a - b) < 1e-4 for a, b in zip(sorted(top.values(), reverse=True), expected))
        ids.append(chosen)
        generated.append(chosen)
    assert choice.text == tiny.tokenizer.decode(generated)


def test_echo_with_generation_puts_the_prompt_first(server, api, tiny) -> None:
    prompt = "class A:\n"
    out = api.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=0)
    plain = api.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=0)
    ids = tiny.tokenizer.encode(prompt)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == prompt + plain.choices[0].text
    assert lp.token_logprobs[len(ids) :] == plain.choices[0].logprobs.token_logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 3
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])  # logprobs=0: the chosen token alone


def test_lm_eval_loglikelihood_request_and_parser(server, tiny) -> None:
    """The exact body lm-evaluation-harness 0.4's local-completions sends for loglikelihood
    (a batch of token-id prompts, echo, max_tokens 1, logprobs 1), parsed by its own code."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    pairs = [("def f(x):\n    return", " x + 1"), ("import", " os"), ("for i in", " range(3):")]
    inputs, ctxlens = [], []
    for context, continuation in pairs:
        c, w = tiny.tokenizer.encode(context), tiny.tokenizer.encode(continuation)
        inputs.append(c + w)
        ctxlens.append(len(c))
    payload = LocalCompletionsAPI._create_payload(SimpleNamespace(model=MODEL), inputs, generate=False, seed=1234)
    assert payload["echo"] is True and payload["max_tokens"] == 1 and payload["logprobs"] == 1
    answer = post(server, C, payload)
    assert answer.status_code == 200, answer.text
    parsed = LocalCompletionsAPI.parse_logprobs(answer.json(), tokens=inputs, ctxlens=ctxlens)
    for (total, greedy), ids, ctxlen in zip(parsed, inputs, ctxlens):
        ref = reference_logprobs(tiny, ids)
        expected = sum(ref[t - 1, ids[t]].item() for t in range(ctxlen, len(ids)))
        assert abs(total - expected) < 1e-4
        assert greedy == all(int(ref[t - 1].argmax()) == ids[t] for t in range(ctxlen, len(ids)))


def test_chat_logprobs_with_the_openai_client(server, api, tiny) -> None:
    messages = [{"role": "user", "content": "hi"}]
    out = api.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    ids = ChatEncoder(tiny.tokenizer).encode(messages)
    for entry in content:
        ref = reference_logprobs(tiny, ids)[-1]
        best = ref.topk(3)
        assert [t.token for t in entry.top_logprobs] == [
            tiny.tokenizer.decode([i], skip_special=False) for i in best.indices.tolist()
        ]
        assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(entry.top_logprobs, best.values.tolist()))
        assert entry.token == entry.top_logprobs[0].token and abs(entry.logprob - best.values[0].item()) < 1e-4
        assert bytes(entry.bytes).decode() == entry.token and all(
            bytes(t.bytes).decode() == t.token for t in entry.top_logprobs
        )
        ids.append(int(best.indices[0]))
    without = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert without.choices[0].logprobs is None


def test_streamed_logprobs_equal_the_whole_answer(server, api) -> None:
    kwargs = dict(model=MODEL, prompt="while ", max_tokens=5, temperature=0, logprobs=2)
    whole = api.completions.create(**kwargs).choices[0].logprobs
    tokens, values, offsets = [], [], []
    for chunk in api.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
    assert (tokens, values, offsets) == (whole.tokens, whole.token_logprobs, whole.text_offset)
    messages = [{"role": "user", "content": "hi"}]
    chat = dict(model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    whole_chat = [(c.token, c.logprob) for c in api.chat.completions.create(**chat).choices[0].logprobs.content]
    streamed = [
        (c.token, c.logprob)
        for chunk in api.chat.completions.create(stream=True, **chat)
        for choice in chunk.choices
        if choice.logprobs is not None
        for c in choice.logprobs.content
    ]
    assert streamed == whole_chat


def test_tokenize_and_detokenize_round_trip(server, tiny) -> None:
    text = "def f():\n    return 'héllo' <|endoftext|>"
    answer = post(server, "/tokenize", {"model": MODEL, "prompt": text, "add_special_tokens": False}).json()
    expected = tiny.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    assert answer == {"count": len(expected), "max_model_len": 64, "tokens": expected}
    back = post(server, "/detokenize", {"model": MODEL, "tokens": answer["tokens"]}).json()
    assert back == {"prompt": tiny.tokenizer.tokenizer.decode(expected, skip_special_tokens=False)} == {"prompt": text}
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    chat = post(server, "/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == ChatEncoder(tiny.tokenizer).encode(messages)
    no_prompt = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert no_prompt["tokens"] == ChatEncoder(tiny.tokenizer).encode(messages, add_generation_prompt=False)
    strs = post(server, "/tokenize", {"prompt": "ab", "return_token_strs": True}).json()
    assert strs["token_strs"] == ["a", "b"]
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64 and info["chat_template"]


def test_lm_eval_remote_tokenizer_sees_the_endpoints(server, tiny) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    base = server.url + "/v1/completions"
    assert check_remote_tokenizer_support(base)
    remote = RemoteTokenizer(base)
    assert remote.encode("import os") == tiny.tokenizer.encode("import os")
    assert remote.decode(tiny.tokenizer.encode("import os")) == "import os"
    assert remote.eos_token_id == tiny.tokenizer.eos_id


GOOD = {"model": MODEL, "prompt": "x", "max_tokens": 1}
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
ERRORS = [
    ("logprobs above the limit", C, {**GOOD, "logprobs": 21}, "logprobs"),
    ("logprobs negative", C, {**GOOD, "logprobs": -1}, "logprobs"),
    ("logprobs true for completions", C, {**GOOD, "logprobs": True}, "logprobs"),
    ("echo not boolean", C, {**GOOD, "echo": "yes"}, "echo"),
    ("echo with stream", C, {**GOOD, "echo": True, "stream": True}, "echo"),
    ("max_tokens 0 without echo", C, {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("max_tokens negative with echo", C, {**GOOD, "max_tokens": -1, "echo": True}, "max_tokens"),
    ("chat logprobs an integer", CC, {**GOOD_CHAT, "logprobs": 3}, "logprobs"),
    ("top_logprobs without logprobs", CC, {**GOOD_CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("top_logprobs above the limit", CC, {**GOOD_CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs negative", CC, {**GOOD_CHAT, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("tokenize without prompt", "/tokenize", {"prompt": 3}, "prompt"),
    ("tokenize unknown field", "/tokenize", {"prompt": "x", "echo": True}, "echo"),
    ("detokenize not ids", "/detokenize", {"tokens": ["a"]}, "tokens"),
    ("detokenize outside the vocabulary", "/detokenize", {"tokens": [1, 10**6]}, "tokens"),
    ("token prompt outside the vocabulary", C, {**GOOD, "prompt": [1, -1]}, "prompt"),
]


@pytest.mark.parametrize("name, path, body, param", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_logprob_requests_are_400_naming_the_parameter(server, api, name, path, body, param) -> None:
    answer = post(server, path, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    if param in ("logprobs", "top_logprobs") and "above" in name:
        assert "20" in error["message"]
    assert api.completions.create(model=MODEL, prompt="x", max_tokens=1, logprobs=1).choices[0].logprobs


def test_logprobs_are_finite_json(server) -> None:
    answer = post(server, C, {**GOOD, "prompt": "ab", "echo": True, "max_tokens": 2, "logprobs": 20})
    assert answer.status_code == 200
    body = json.loads(answer.text)  # strict JSON: no NaN or Infinity
    values = [v for v in body["choices"][0]["logprobs"]["token_logprobs"] if v is not None]
    assert values and all(math.isfinite(v) and v <= 0 for v in values)
