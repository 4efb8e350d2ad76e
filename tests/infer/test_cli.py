"""`moelab serve` and `moelab chat`: bad input gets one line and exit 2; chat streams the same
replies as the reference; serve runs end to end as a real process."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from moelab.cli import main
from moelab.cli.serve import ChatSession
from moelab.data.tokenizer import IM_END
from moelab.infer.chat import ChatEncoder, render_chat
from moelab.infer.engine import Engine, EngineConfig
from moelab.infer.generate import generate
from moelab.infer.http_transport import bind
from moelab.infer.sampling import SamplingParams
from tests.infer.helpers import wait_for

GREEDY = SamplingParams(temperature=0)


def usage_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("moelab: error:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def test_serve_refuses_bad_input(capsys, tiny_run, tmp_path, monkeypatch) -> None:
    assert "does not exist" in usage_error(capsys, "serve", str(tmp_path / "missing"))
    assert "not a moelab run directory" in usage_error(capsys, "serve", str(tmp_path))
    assert "--port 70000" in usage_error(capsys, "serve", str(tiny_run), "--port", "70000")
    assert "--max-batch" in usage_error(capsys, "serve", str(tiny_run), "--max-batch", "0")
    assert "--max-body-bytes" in usage_error(capsys, "serve", str(tiny_run), "--max-body-bytes", "10")
    assert "--threads -1" in usage_error(capsys, "serve", str(tiny_run), "--threads", "-1")
    monkeypatch.setenv("MOELAB_API_KEY", " ")
    assert "API key" in usage_error(capsys, "serve", str(tiny_run))
    monkeypatch.delenv("MOELAB_API_KEY")
    taken = bind("127.0.0.1", 0)
    taken.listen()
    try:
        port = str(taken.getsockname()[1])
        assert f"cannot listen on 127.0.0.1:{port}" in usage_error(capsys, "serve", str(tiny_run), "--port", port)
    finally:
        taken.close()


def test_serve_exits_when_the_model_fails_to_load(capsys, tiny_run, tmp_path) -> None:
    import shutil

    run = tmp_path / "damaged"
    shutil.copytree(tiny_run, run)
    weights = sorted(run.glob("checkpoints/*/model.safetensors"))[-1]
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    line = usage_error(capsys, "serve", str(run), "--port", "0", "--log-level", "critical")
    assert line.startswith(f"moelab: error: cannot serve {run}") and "model.safetensors" in line


def test_chat_refuses_bad_input(capsys, tiny_run, tmp_path) -> None:
    assert "top_p" in usage_error(capsys, "chat", str(tiny_run), "--top-p", "2")
    assert "--max-tokens" in usage_error(capsys, "chat", str(tiny_run), "--max-tokens", "0")
    assert "does not exist" in usage_error(capsys, "chat", str(tmp_path / "missing"))


def test_chat_session_replies_like_the_reference_and_keeps_history(tiny) -> None:
    script = iter(["hi", "more", "/reset", "again", "/exit", "never read"])
    written: list[str] = []
    im_end = tiny.tokenizer.token_id(IM_END)

    def reference(messages) -> str:
        return generate(tiny.model, tiny.tokenizer, render_chat(messages), 4, GREEDY, stop_token_ids={im_end})

    with Engine(tiny.model, tiny.tokenizer, EngineConfig(max_batch=1)) as engine:
        session = ChatSession(engine, ChatEncoder(tiny.tokenizer), GREEDY, 4, None, "Hi.")
        session.repl(lambda prompt: next(script), written.append)
    system = [{"role": "system", "content": "Hi."}]  # 13 tokens: the second turn still fits in 64
    first = reference(system + [{"role": "user", "content": "hi"}])
    second = reference(
        system
        + [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "more"},
        ]
    )
    after_reset = reference(system + [{"role": "user", "content": "again"}])
    assert (
        "".join(written) == f"assistant> {first}\nassistant> {second}\n[new conversation]\nassistant> {after_reset}\n"
    )
    assert next(script) == "never read"  # /exit ended the session


def test_chat_drops_the_oldest_turns_to_fit_the_context(tiny) -> None:
    with Engine(tiny.model, tiny.tokenizer, EngineConfig(max_batch=1)) as engine:
        session = ChatSession(engine, ChatEncoder(tiny.tokenizer), GREEDY, 4, None, None)
        session.turns = [
            {"role": "user", "content": "a" * 20},
            {"role": "assistant", "content": "b" * 20},
            {"role": "user", "content": "c"},
        ]
        ids = session.prompt_ids()
        assert [t["content"] for t in session.turns] == ["c"] and len(ids) < engine.context
        session.turns.append({"role": "assistant", "content": "d"})
        written: list[str] = []
        assert session.reply("x" * 100, written.append) == ""
        assert "does not fit" in "".join(written) and session.turns == []


def test_chat_command_runs_a_conversation(capsys, tiny_run, monkeypatch) -> None:
    script = iter(["hi"])

    def fake_input(prompt: str) -> str:
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", str(tiny_run), "--temperature", "0", "--max-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("assistant> ")


def first_match(stream, pattern: str, timeout: float) -> str | None:
    """The first group of the first line of `stream` matching `pattern`, read on a thread so a
    silent process cannot hang the test."""
    found: queue.SimpleQueue = queue.SimpleQueue()

    def scan() -> None:
        for line in stream:
            match = re.search(pattern, line)
            if match:
                found.put(match.group(1))
                break
        for _ in stream:  # keep draining so the process never blocks on a full pipe
            pass

    threading.Thread(target=scan, daemon=True).start()
    try:
        return found.get(timeout=timeout)
    except queue.Empty:
        return None


@pytest.mark.slow
def test_serve_command_end_to_end(tiny_run) -> None:
    """`moelab serve` as its own process: listens at once, loads, answers, stops on Ctrl-C."""
    env = {**os.environ, "MOELAB_API_KEY": "k", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    command = [
        sys.executable,
        "-m",
        "moelab",
        "serve",
        str(tiny_run),
        "--port",
        "0",
        "--model-name",
        "m",
        "--device",
        "cpu",
    ]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = first_match(process.stderr, r"listening on (http://\S+);", timeout=120)
        assert url, "the server never said where it listens"
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, timeout=120, what="the model to load")
        api = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
        reply = api.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        assert reply.usage.completion_tokens <= 3 and reply.choices[0].finish_reason in ("stop", "length")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode in (0, 130, -signal.SIGINT)
