"""Jinja chat templates: the same token ids as transformers' apply_chat_template for a
Qwen2.5-style tokenizer built here (no downloads); template failures and hostile templates are
400s; an imported run's template is served; a bad --chat-template file is a one-line error."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from moelab.data.tokenizer import EOS, TextTokenizer, bytes_to_unicode
from moelab.infer.chat_template import (
    ChatTemplateError,
    TemplateChat,
    chat_format,
    compile_chat_template,
    read_run_chat_files,
)
from moelab.infer.generate import generate
from moelab.infer.sampling import SamplingParams
from moelab.infer.server import load_servable
from tests.infer.helpers import MODEL, client, ready, start
from tests.infer.test_cli import usage_error

transformers = pytest.importorskip("transformers")

# Qwen2.5-Instruct's chat template (tokenizer_config.json of the Qwen2.5 instruct models)
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# What transformers-specific features a template may use: special-token variables, tojson
# without HTML escaping, namespace, loop controls, the {% generation %} tag.
FEATURES_TEMPLATE = """{{ bos_token }}{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message.role == 'system' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    [{{ ns.turns }}] {{ message.role }}: {{ message.content | tojson }}
    {% if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}{{ eos_token }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}[{{ ns.turns + 1 }}] assistant:{% endif %}"""

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CONVERSATIONS = {
    "one user message (default system)": [{"role": "user", "content": "Hello!"}],
    "system and multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And <b>3 + 3</b>, in « French »?"},
    ],
    "a second system message mid-conversation": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello\n\nthere"},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ok"},
    ],
}


@pytest.fixture(scope="module")
def qwen_like():
    """A byte-level BPE with Qwen2's special tokens, as a moelab TextTokenizer and as transformers'
    PreTrainedTokenizerFast carrying the Qwen2.5 template."""
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in bytes_to_unicode().items()}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "m"), ("Ċ", "Ċ")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    raw = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(QWEN_SPECIAL)
    ours = TextTokenizer(Tokenizer.from_str(raw.to_str()), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    theirs = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN25_TEMPLATE
    )
    return ours, theirs


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_qwen_template_ids_equal_transformers(qwen_like, name, add_generation_prompt) -> None:
    ours, theirs = qwen_like
    messages = CONVERSATIONS[name]
    chat = TemplateChat(ours, QWEN25_TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    expected_text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    expected_ids = theirs.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert chat.render(messages, add_generation_prompt) == expected_text
    assert chat.encode(messages, add_generation_prompt) == list(expected_ids)
    if name.startswith("one user"):
        assert "You are Qwen, created by Alibaba Cloud." in expected_text
    im_start, im_end = ours.token_id("<|im_start|>"), ours.token_id("<|im_end|>")
    default_system = messages[0]["role"] != "system"
    assert chat.encode(messages).count(im_start) == len(messages) + default_system + 1
    assert im_end in chat.stop_token_ids


def test_transformers_template_features_render_the_same(qwen_like) -> None:
    ours, theirs = qwen_like
    theirs = theirs.__class__(
        tokenizer_object=theirs.backend_tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    chat = TemplateChat(ours, FEATURES_TEMPLATE, special)
    messages = CONVERSATIONS["system and multi-turn"]
    expected = theirs.apply_chat_template(
        messages, chat_template=FEATURES_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert chat.render(messages) == expected
    assert '"And <b>3 + 3</b>, in « French »?"' in expected  # tojson: no HTML escaping, no \\u escapes


FAILING = {
    "raise_exception": (
        "{{ raise_exception('system messages are not supported') }}",
        "system messages are not supported",
    ),
    "undefined": ("{{ messages[0].nothing.deeper }}", "nothing"),
    "python internals": ("{{ ''.__class__.__mro__ }}", "__class__"),
    "function globals": ("{{ cycler.__init__.__globals__ }}", "__init__"),
    "namespace dunder": ("{% set ns = namespace(_x=1) %}", "_x"),
    "a type error": ("{{ 'a' + 1 }}", "TypeError"),
}


@pytest.mark.parametrize("name", list(FAILING))
def test_failing_and_hostile_templates_raise_template_errors(qwen_like, name) -> None:
    template, words = FAILING[name]
    with pytest.raises(ChatTemplateError, match=words.replace("(", r"\(")):
        TemplateChat(qwen_like[0], template).render([{"role": "user", "content": "x"}])


def test_a_template_that_does_not_parse_names_the_line() -> None:
    with pytest.raises(ChatTemplateError, match="line 2"):
        compile_chat_template("ok\n{% if %}")


def test_chat_format_choice(tiny, qwen_like) -> None:
    from moelab.infer.chat import ChatEncoder

    assert isinstance(chat_format(tiny.tokenizer, None), ChatEncoder)  # moelab's own: ChatML
    assert isinstance(chat_format(tiny.tokenizer, QWEN25_TEMPLATE), TemplateChat)  # an override wins
    assert chat_format(qwen_like[0], None) is None  # an imported tokenizer without a template


# A template that is plainly not ChatML (so the test sees which format served), with branches that
# fail on purpose, picked by the last message's content.
SERVED_TEMPLATE = """{% set last = messages[-1].content %}
{% if last == 'raise' %}{{ raise_exception('the template refuses: ' + last) }}
{% elif last == 'undefined' %}{{ messages[0].nope.deeper }}
{% elif last == 'mro' %}{{ ''.__class__.__mro__ }}
{% elif last == 'globals' %}{{ cycler.__init__.__globals__ }}
{% endif %}
{% for m in messages %}{{ m.role | upper }}: {{ m.content }}
{% endfor %}
{% if add_generation_prompt %}ASSISTANT:{% endif %}"""


@pytest.fixture(scope="module")
def imported_run(tiny_run, tmp_path_factory):
    """The tiny run with Hugging Face tokenizer files, as `moelab import` leaves them."""
    run = tmp_path_factory.mktemp("imported") / "run"
    shutil.copytree(tiny_run, run)
    config = {"eos_token": EOS, "pad_token": None, "bos_token": None, "chat_template": "ignored: the .jinja file wins"}
    (run / "tokenizer_config.json").write_text(json.dumps(config))
    (run / "chat_template.jinja").write_text(SERVED_TEMPLATE)
    (run / "generation_config.json").write_text(json.dumps({"eos_token_id": [256, 259]}))
    return run


def test_run_chat_files(imported_run) -> None:
    files = read_run_chat_files(imported_run)
    assert files.template == SERVED_TEMPLATE
    assert files.special_tokens == {"eos_token": EOS} and files.eos_ids == {256, 259}


def test_an_imported_run_serves_its_template(imported_run, tiny) -> None:
    servable = load_servable(imported_run, "cpu")
    servable.model = tiny.model  # the same weights, already in serving form
    srv = start(lambda: servable)
    try:
        ready(srv)
        api = client(srv)
        messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
        reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        text = "SYSTEM: S\nUSER: hi\nASSISTANT:"
        expected = generate(
            tiny.model, tiny.tokenizer, text, 6, SamplingParams(temperature=0), stop_token_ids={256, 259}
        )
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == len(tiny.tokenizer.encode(text))
        tokens = httpx.post(srv.url + "/tokenize", json={"messages": messages}).json()["tokens"]
        assert tokens == tiny.tokenizer.encode(text)
        info = httpx.get(srv.url + "/tokenizer_info").json()
        assert info["chat_template"] == SERVED_TEMPLATE
        for content, words in [
            ("raise", "the template refuses: raise"),
            ("undefined", "nope"),
            ("mro", "__class__"),
            ("globals", "__init__"),
        ]:
            with pytest.raises(openai.BadRequestError) as exc:
                api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}])
            error = exc.value.body
            assert error["code"] == "chat_template_error" and error["param"] == "messages", error
            assert words in error["message"]
        assert (
            api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
            .choices[0]
            .message.content
            == expected
        )  # still serving
    finally:
        srv.stop()


def test_an_imported_run_without_a_template_names_the_fix(imported_run, tiny, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(imported_run, run)
    (run / "chat_template.jinja").unlink()
    (run / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    servable = load_servable(run, "cpu")
    servable.model = tiny.model
    srv = start(lambda: servable)
    try:
        ready(srv)
        answer = httpx.post(
            srv.url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        )
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "chat_not_supported"
        assert "--chat-template FILE" in answer.json()["error"]["message"]
        assert client(srv).completions.create(model=MODEL, prompt="x", max_tokens=1).usage.completion_tokens == 1
    finally:
        srv.stop()


def test_chat_template_flag_overrides_and_bad_files_are_one_line_errors(capsys, tiny_run, tmp_path) -> None:
    missing = tmp_path / "missing.jinja"
    assert "--chat-template" in usage_error(capsys, "serve", str(tiny_run), "--chat-template", str(missing))
    assert "--chat-template" in usage_error(capsys, "chat", str(tiny_run), "--chat-template", str(missing))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }")
    line = usage_error(capsys, "serve", str(tiny_run), "--chat-template", str(broken))
    assert "not a valid Jinja template" in line and "line 2" in line
    good = tmp_path / "good.jinja"
    good.write_text(SERVED_TEMPLATE)
    servable = load_servable(tiny_run, "cpu", chat_template=good.read_text())
    assert servable.chat_template == SERVED_TEMPLATE
