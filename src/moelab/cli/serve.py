"""`moelab serve` and `moelab chat`."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable

from moelab.cli.common import add_sampling_flags, sampling_params
from moelab.errors import MoelabError

API_KEY_ENV = "MOELAB_API_KEY"
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 5.0  # as moelab.infer.http_transport's (not imported: the CLI starts without FastAPI)
DEFAULT_MAX_CONNECTIONS = 256


def _engine_config(args: argparse.Namespace):
    from moelab.infer.engine import EngineConfig

    config = EngineConfig(
        max_batch=args.max_batch, max_queue=args.max_queue, max_prefill_tokens=args.max_prefill_tokens
    )
    try:
        config.validate()
    except ValueError as exc:
        raise MoelabError(f"--{str(exc).replace('_', '-')}") from None
    return config


def _set_threads(threads: int) -> None:
    """--threads: torch's intra-op threads for this process (the engine thread inherits them).

    NOTE: the default is 1. Decoding runs many small operations on the engine's worker thread,
    where each multi-threaded one pays for waking the OpenMP team (measured with
    benchmarks/serve.py --threads: docs/architecture.md, Measured choices). Large models on many cores want more: --threads 0 keeps torch's default."""
    import torch

    if threads < 0:
        raise MoelabError(f"--threads {threads} is not allowed: an integer >= 1, or 0 for torch's default")
    if threads:
        torch.set_num_threads(threads)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run (its newest checkpoint) or one checkpoint over HTTP with the OpenAI API:
    GET /v1/models, POST /v1/completions (with logprobs and echo), POST /v1/chat/completions
    (streaming with "stream": true), POST /tokenize and /detokenize, GET /health (503 while the
    model loads) and GET /metrics (Prometheus). Chat uses the model's chat template (an imported
    model's own, or --chat-template FILE), or moelab's ChatML for moelab's own models.
    Requests that arrive while others are generating join the running batch at the next step.
    With --api-key (or the MOELAB_API_KEY environment variable) every route but /health needs the
    header 'Authorization: Bearer KEY'. See docs/serving.md."""
    from moelab.extras import require

    require("moelab serve", "serve")  # fastapi, uvicorn, prometheus_client, jinja2 (chat templates)
    from moelab.device import resolve_device
    from moelab.infer.chat_template import read_chat_template
    from moelab.infer.http_transport import bind, uvicorn_server
    from moelab.infer.server import ServerSettings, create_app, load_servable
    from moelab.rundir import resolve_checkpoint

    run, checkpoint = resolve_checkpoint(args.run)  # bad paths fail now, not in the background
    resolve_device(args.device)
    template = read_chat_template(args.chat_template) if args.chat_template is not None else None
    _set_threads(args.threads)
    if not 0 <= args.port <= 65535:
        raise MoelabError(f"--port {args.port} is not allowed: 0 (any free port) to 65535")
    if args.max_body_bytes < 1024:
        raise MoelabError(f"--max-body-bytes {args.max_body_bytes} is not allowed: at least 1024")
    if not (math.isfinite(args.timeout_keep_alive) and args.timeout_keep_alive > 0):
        raise MoelabError(f"--timeout-keep-alive {args.timeout_keep_alive:g} is not allowed: a number of seconds > 0")
    if args.max_connections < 1:
        raise MoelabError(f"--max-connections {args.max_connections} is not allowed: an integer >= 1")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        raise MoelabError(f"the API key (--api-key or ${API_KEY_ENV}) is empty; give a key or leave both unset")
    name = args.model_name or run.path.name
    settings = ServerSettings(
        model_name=name, api_key=api_key, max_body_bytes=args.max_body_bytes, engine=_engine_config(args)
    )
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        raise MoelabError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s:     %(message)s")
    failures: list[str] = []
    server = None

    def stop_on_load_error(message: str) -> None:
        failures.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(lambda: load_servable(checkpoint, args.device, template), settings, stop_on_load_error)
    server = uvicorn_server(app, args.host, args.port, args.log_level, args.timeout_keep_alive, args.max_connections)
    port = sock.getsockname()[1]
    url = f"http://[{args.host}]:{port}" if ":" in args.host else f"http://{args.host}:{port}"
    auth = "Bearer key required" if api_key else "no API key"
    print(
        f"moelab: listening on {url}; serving {checkpoint} as model {name!r} ({auth}); loading in the background",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failures:
        raise MoelabError(f"cannot serve {args.run}: {failures[0]}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a run in the terminal, through the same engine and chat format as the server.
    An imported model uses its tokenizer's chat template (or --chat-template FILE).
    Type a message and the reply streams as it is generated. /reset starts a new conversation,
    /exit (or Ctrl-D) quits, Ctrl-C stops a reply. When the conversation outgrows the context
    window the oldest turns are dropped."""
    from moelab.device import resolve_device
    from moelab.infer.chat_template import ChatTemplateError, chat_format, read_chat_template, read_run_chat_files
    from moelab.infer.engine import Engine, EngineConfig
    from moelab.rundir import load_model

    params = sampling_params(args)
    if args.max_tokens < 1:
        raise MoelabError(f"--max-tokens {args.max_tokens} is not allowed: an integer >= 1")
    template = read_chat_template(args.chat_template) if args.chat_template is not None else None
    _set_threads(args.threads)
    loaded = load_model(args.run, resolve_device(args.device))
    files = read_run_chat_files(loaded.run.path)
    try:
        encoder = chat_format(loaded.tokenizer, template or files.template, files.special_tokens, files.eos_ids)
    except ChatTemplateError as exc:
        raise MoelabError(
            f"{args.run}: the model's chat template does not parse ({exc}); give --chat-template FILE"
        ) from None
    if encoder is None:
        raise MoelabError(
            f"{args.run}: the model's tokenizer has no chat template; give --chat-template FILE, or use moelab generate"
        )
    with Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch=1, max_queue=1)) as engine:
        session = ChatSession(engine, encoder, params, args.max_tokens, args.seed, args.system)
        print(
            f"moelab chat with {loaded.run.path} (step {loaded.step}); /reset starts over, /exit quits", file=sys.stderr
        )
        session.repl(input, _write)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class ChatSession:
    """A conversation held in the terminal: the history, trimmed to the context window."""

    def __init__(self, engine, encoder, params, max_tokens: int, seed: int | None, system: str | None):
        self.engine, self.encoder, self.params = engine, encoder, params
        self.max_tokens, self.seed = max_tokens, seed
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []

    def prompt_ids(self) -> list[int] | None:
        """The conversation's ids with room for at least one reply token, dropping the oldest
        turns as needed; None if even the last message alone does not fit."""
        while True:
            ids = self.encoder.encode(self.system + self.turns)
            if len(ids) < self.engine.context:
                return ids
            if len(self.turns) <= 1:
                self.turns = []
                return None
            self.turns = self.turns[2 if len(self.turns) > 2 else 1 :]  # the oldest turn and its reply

    def reply(self, message: str, write: Callable[[str], None]) -> str:
        from moelab.infer.chat_template import ChatTemplateError
        from moelab.infer.engine import Chunk, Failed, Request

        self.turns.append({"role": "user", "content": message})
        try:
            ids = self.prompt_ids()
        except ChatTemplateError as exc:
            self.turns.pop()
            write(f"[the chat template failed: {exc}]\n")
            return ""
        if ids is None:
            write(f"[the message does not fit the context window of {self.engine.context} tokens]\n")
            return ""
        request = Request(
            (tuple(ids),),
            min(self.max_tokens, self.engine.context - len(ids)),
            self.params,
            seed=self.seed,
            stop_token_ids=self.encoder.stop_token_ids,
        )
        pieces = []
        try:
            for event in self.engine.stream(request):
                if isinstance(event, Chunk) and event.text:
                    pieces.append(event.text)
                    write(event.text)
                elif isinstance(event, Failed):
                    write(f"\n[generation failed: {event.message}]")
        except KeyboardInterrupt:  # stops this reply (the stream cancels the request), not the chat
            write(" [stopped]")
        write("\n")
        text = "".join(pieces)
        self.turns.append({"role": "assistant", "content": text})
        return text

    def repl(self, read: Callable[[str], str], write: Callable[[str], None]) -> None:
        while True:
            try:
                line = read("you> ")
            except (EOFError, KeyboardInterrupt):
                write("\n")
                return
            command = line.strip()
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                self.turns = []
                write("[new conversation]\n")
                continue
            if command:
                write("assistant> ")
                self.reply(line, write)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch", type=int, default=16, help="sequences generated together (KV-cache rows; default 16)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait for a free row; more get 429 (default 64)"
    )
    p.add_argument(
        "--max-prefill-tokens", type=int, default=4096, help="padded prompt tokens prefilled in one step (default 4096)"
    )


def register(sub, command) -> None:
    """Add this subsystem's subcommands to the `moelab` parser."""
    p = command(sub, "serve", cmd_serve, "serve a run over HTTP with the OpenAI API (completions, chat, streaming)")
    p.add_argument(
        "run",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="a run directory (its newest checkpoint) or one checkpoint directory",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 = any free port)")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set, else no key)",
    )
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the run directory's name)")
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template for /v1/chat/completions (default: the model's own: an imported model's "
        "tokenizer template, or moelab's ChatML)",
    )
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    p.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=DEFAULT_TIMEOUT_KEEP_ALIVE_S,
        metavar="S",
        help="close a connection that has not sent a whole request S seconds after it opened or after its last "
        f"answer, or whose body pauses longer (default {DEFAULT_TIMEOUT_KEEP_ALIVE_S:g})",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"open connections served; beyond them a request gets 503 (default {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: fastest for small models, see docs/serving.md; 0 = torch's default)",
    )
    _add_engine_flags(p)

    p = command(sub, "chat", cmd_chat, "chat with a run in the terminal")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory or one of its checkpoints")
    p.add_argument(
        "--chat-template", default=None, metavar="FILE", help="a Jinja chat template (default: the model's own)"
    )
    p.add_argument("--system", default=None, help="a system message that starts the conversation")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (cut to the context window)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: fastest for small models; 0 = torch's default)",
    )
    add_sampling_flags(p)
