"""Serving throughput and latency: the default MoE against its dense twins, in one process.

Models: the small-moe preset (randomly initialised: speed does not depend on training), its dense
twin with the same active compute (FFN hidden = k*I) and a dense model with the same total
parameters, built with moelab.analysis.compare.dense_twin. The tokenizer is a byte-level BPE
trained here on a slice of the standard library's source.

For each concurrency C (default 1, 4, 16), C client threads each send --requests requests one
after another to the engine (random prompts of --prompt-tokens tokens, --new-tokens tokens each,
end-of-text ignored so every request has the same length). Reported per model and C: generated
tokens/s over the whole run, time to first token (p50, p99) and time per output token (the gap
between consecutive tokens of a request, p50, p99). Rounds interleave the models and the median
round is kept, so the ratios compare like with like on a busy machine.

Also reported: decode throughput at batch 1 and the prefill time of one prompt, measured on the
model alone (median of the per-round MoE / dense ratios of interleaved rounds), and a diagnostic of what one MoE layer pays at batch 1 for the
experts no token chose.

    python benchmarks/serve.py [--concurrency 1,4,16] [--requests 2] [--rounds 3] [--threads 1] [--http]
                               [--preset small-moe] [--set KEY=VALUE ...] [--out benchmarks/results/serve.json]

The issue's transformers reference shape (Mixtral-like, D=512, 8 layers, E=8, k=2, I=1024):
    --preset small-moe-coarse --set model.d_model=512 --set model.n_layers=8 --set model.n_heads=8
    --set model.ffn_hidden=2048 --set model.moe.expert_hidden=1024

--http sends the same load through the real server (uvicorn, SSE streaming, the openai client),
the client threads in a process of their own.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelab.analysis.compare import dense_twin  # noqa: E402
from moelab.config import load_config  # noqa: E402
from moelab.data.tokenizer import TextTokenizer, train_bpe  # noqa: E402
from moelab.errors import ConfigError  # noqa: E402
from moelab.infer.engine import Chunk, Engine, EngineConfig, Failed, Request  # noqa: E402
from moelab.infer.few_token import route_few_tokens  # noqa: E402
from moelab.infer.moe_layer import prepare_for_inference  # noqa: E402
from moelab.infer.sampling import SamplingParams  # noqa: E402
from moelab.model import (  # noqa: E402
    KVCache,
    Transformer,
    accounting,  # noqa: E402
)
from moelab.model.mlp import SwiGLU  # noqa: E402

PARAMS = SamplingParams(temperature=0.8, top_p=0.95)


def stdlib_text(limit: int = 2_000_000) -> list[str]:
    import sysconfig

    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(errors="replace")
        texts.append(text)
        size += len(text)
        if size > limit:
            break
    return texts


def moe_config(preset: str = "small-moe", overrides: list[str] | None = None):
    """The MoE config to serve; a clear exit for a bad preset, override or a preset without MoE layers."""
    try:
        cfg = load_config(preset=preset, overrides=overrides or [])
    except ConfigError as e:
        raise SystemExit(f"serve.py: error: {e}") from None
    if cfg.model.moe is None:
        raise SystemExit(
            f"serve.py: error: preset {preset!r} has no MoE layers: nothing to compare with its dense twins"
        )
    return cfg


def build_models(vocab: int, device: str, cfg=None) -> dict[str, Transformer]:
    cfg = copy.deepcopy(cfg) if cfg is not None else moe_config()
    cfg.model.vocab_size = vocab
    configs = {"moe": cfg, "dense-active": dense_twin(cfg, "active"), "dense-total": dense_twin(cfg, "total")}
    models = {}
    for i, (name, c) in enumerate(configs.items()):
        torch.manual_seed(i)
        mcfg = copy.deepcopy(c.model)
        mcfg.vocab_size = vocab
        models[name] = prepare_for_inference(Transformer(mcfg).to(device))  # as the engine serves it
    return models


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# ---------------------------------------------------------------------------------------------
# Load generation


def run_engine_load(
    engine: Engine, prompts: list[tuple[int, ...]], clients: int, requests: int, new_tokens: int
) -> dict:
    """C client threads, each sending its requests one after another; per-request timings."""
    records: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            prompt = prompts[(c * requests + r) % len(prompts)]
            job = Request((prompt,), new_tokens, PARAMS, seed=c * 1000 + r)
            start = time.perf_counter()
            times = []
            for event in engine.stream(job):
                if isinstance(event, Chunk):
                    times.append(event.time)
                elif isinstance(event, Failed):
                    raise RuntimeError(event.message)
            with lock:
                records.append({"start": start, "times": times})

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarise(records, time.perf_counter() - t0)


def http_client_load(
    url: str, model: str, prompts: list[tuple[int, ...]], clients: int, requests: int, new_tokens: int
) -> tuple[list[dict], float]:
    """C openai client threads streaming completions from the server at `url`; per-request
    timings and the wall time. Runs in a process of its own (run_http_load)."""
    import openai

    records: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        api = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
        for r in range(requests):
            prompt = list(prompts[(c * requests + r) % len(prompts)])
            start = time.perf_counter()
            times, tokens = [], 0
            stream = api.completions.create(
                model=model, prompt=prompt, max_tokens=new_tokens, temperature=PARAMS.temperature, top_p=PARAMS.top_p,
                seed=c * 1000 + r, stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            for chunk in stream:
                if chunk.choices:
                    times.append(time.perf_counter())
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            with lock:
                records.append({"start": start, "times": times, "tokens": tokens})

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def run_http_load(
    clients_process, url: str, model: str, prompts: list[tuple[int, ...]], clients: int, requests: int, new_tokens: int
) -> dict:
    """The HTTP load, generated in another process.

    NOTE: with the client threads in the server's own process, 16 openai clients parsing SSE
    competed with the server and the engine for the GIL: the same models measured 16/1 scaling of
    2.8x (MoE) and 3.0x (dense twin) that way, against 3.4x for the trained default model served by
    `moelab serve` and loaded from another process."""
    records, wall = clients_process.submit(
        http_client_load, url, model, prompts, clients, requests, new_tokens
    ).result()
    return summarise(records, wall)


def summarise(records: list[dict], wall: float) -> dict:
    tokens = sum(r.get("tokens", len(r["times"])) for r in records)
    ttft = [r["times"][0] - r["start"] for r in records if r["times"]]
    gaps = [b - a for r in records for a, b in zip(r["times"], r["times"][1:])]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(gaps, 50),
        "tpot_p99_s": percentile(gaps, 99),
    }


# ---------------------------------------------------------------------------------------------
# Model-level measurements


@torch.inference_mode()
def decode_step_s(model: Transformer, context: int, steps: int) -> float:
    """Mean seconds per single-token forward at batch 1 with `context` tokens already cached
    (on CUDA in bf16 autocast with a bf16 cache, as the engine runs)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    cache = KVCache(model.cfg, 1, model.cfg.max_seq_len, device, torch.bfloat16 if cuda else torch.float32)
    with autocast:
        model(torch.randint(0, model.cfg.vocab_size, (1, context), device=device), cache=cache)
        token = torch.randint(0, model.cfg.vocab_size, (1, 1), device=device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for p in range(context, context + steps):
            model(token, positions_BT=torch.tensor([[p]], device=device), cache=cache).logits.argmax(-1).tolist()
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def prefill_s(model: Transformer, prompt_tokens: int, repeats: int) -> float:
    """Mean seconds for the prefill of one prompt at batch 1: a forward of `prompt_tokens` fresh
    random tokens into an empty KV cache and the first token's choice, as the engine starts a
    request (on CUDA in bf16 autocast with a bf16 cache)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    cache = KVCache(model.cfg, 1, model.cfg.max_seq_len, device, torch.bfloat16 if cuda else torch.float32)
    prompts = torch.randint(0, model.cfg.vocab_size, (repeats, 1, prompt_tokens), device=device)
    with autocast:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for prompt in prompts:  # each prompt overwrites the cache's first positions, as a fresh row would
            model(prompt, cache=cache).logits[:, -1].argmax(-1).tolist()
    return (time.perf_counter() - start) / repeats


@torch.inference_mode()
def unchosen_expert_diagnostic(moe_model: Transformer, dense_model: Transformer, repeats: int = 300) -> dict:
    """At one token, caches warm: the MoE layer as decoding runs it (the moe_decode kernel on the CPU)
    and on its PyTorch path, against the dense FFN of the same active compute; the PyTorch
    router; and the grouped matmul with all E groups (E - k of them empty) against the same
    matmul over only the k chosen experts."""
    moe = moe_model.moe_layers()[0]
    dense: SwiGLU = next(b.ffn for b in dense_model.blocks)
    D = moe_model.cfg.d_model
    x_1D = torch.randn(1, D)
    routing = moe.router(x_1D)
    chosen = torch.nonzero(routing.plan.tokens_per_expert_E).flatten()
    gate_up = moe.experts.gate_up_proj
    x_SD = x_1D.index_select(0, routing.plan.token_index_S)
    all_offsets = torch.cumsum(routing.plan.tokens_per_expert_E, 0).to(torch.int32)
    chosen_weights = gate_up.index_select(0, chosen).contiguous()
    chosen_offsets = torch.cumsum(routing.plan.tokens_per_expert_E[chosen], 0).to(torch.int32)

    def timed(fn) -> float:
        fn()
        best = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            best.append((time.perf_counter() - start) / repeats)
        return statistics.median(best)

    torch_path = copy.deepcopy(moe)
    torch_path.use_moe_decode = False
    result = {
        "moe_layer_us": timed(lambda: moe(x_1D[None])) * 1e6,
        "moe_layer_pytorch_path_us": timed(lambda: torch_path(x_1D[None])) * 1e6,
        "dense_ffn_us": timed(lambda: dense(x_1D[None])) * 1e6,
        "router_us": timed(lambda: route_few_tokens(moe.router, x_1D)) * 1e6,  # as the PyTorch decode path routes
        "grouped_mm_all_groups_us": timed(lambda: torch._grouped_mm(x_SD, gate_up.transpose(-2, -1), offs=all_offsets))
        * 1e6,
        "grouped_mm_chosen_groups_us": timed(
            lambda: torch._grouped_mm(x_SD, chosen_weights.transpose(-2, -1), offs=chosen_offsets)
        )
        * 1e6,
        "experts": moe.cfg.num_experts,
        "top_k": moe.cfg.top_k,
    }
    return result


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client thread")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, as moelab serve; 0 = torch's default)",
    )
    ap.add_argument("--http", action="store_true", help="through the HTTP server instead of the engine directly")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the engine runs bf16 autocast on CUDA)")
    ap.add_argument(
        "--preset", default="small-moe", help="the MoE preset to serve (its dense twins are derived from it)"
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. model.d_model=512 (repeatable)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]

    moe_cfg = moe_config(args.preset, args.overrides)  # before the tokenizer: bad input fails fast
    tokenizer: TextTokenizer = train_bpe(iter(stdlib_text()), 2048)
    models = build_models(tokenizer.vocab_size, args.device, moe_cfg)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        tuple(torch.randint(0, tokenizer.vocab_size, (args.prompt_tokens,), generator=gen).tolist()) for _ in range(64)
    ]
    cfg = models["moe"].cfg
    moe = cfg.moe
    header = (
        f"serving benchmark: RANDOMLY INITIALISED models of the {args.preset} preset{' with ' + ' '.join(args.overrides) if args.overrides else ''} (D={cfg.d_model}, {cfg.n_layers} layers, "
        f"E={moe.num_experts}, k={moe.top_k}, I={moe.expert_hidden}, vocab {tokenizer.vocab_size}) and its dense twins; "
        f"{'HTTP server + openai client' if args.http else 'engine in process'}, {args.device}, {torch.get_num_threads()} torch threads, "
        f"prompts {args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.requests} requests per client, sampling {PARAMS}"
    )
    print(header, flush=True)
    results = {
        "header": header,
        "preset": args.preset,
        "overrides": args.overrides,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "mode": "http" if args.http else "engine",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "models": {},
        "runs": {},
    }
    for name, model in models.items():
        counts = accounting.param_counts(model.cfg, tokenizer.vocab_size)
        results["models"][name] = {
            "total_params": counts.total,
            "active_params": counts.active,
            "ffn_hidden": model.cfg.ffn_hidden,
        }

    max_batch = max(levels)
    servers, engines = {}, {}
    # the HTTP load comes from a process of its own (run_http_load); spawned, not forked: this one runs threads
    clients_process = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) if args.http else None
    for name, model in models.items():
        config = EngineConfig(max_batch=max_batch, max_queue=4 * max_batch)
        if args.http:
            from moelab.infer.http_transport import BackgroundServer
            from moelab.infer.server import Servable, ServerSettings, create_app

            app = create_app(lambda m=model: Servable(m, tokenizer), ServerSettings(model_name=name, engine=config))
            servers[name] = BackgroundServer(app).start()
            import httpx

            while httpx.get(servers[name].url + "/health").status_code != 200:
                time.sleep(0.05)
        else:
            engines[name] = Engine(model, tokenizer, config).start()

    def load(name: str, clients: int) -> dict:
        if args.http:
            return run_http_load(
                clients_process, servers[name].url, name, prompts, clients, args.requests, args.new_tokens
            )
        return run_engine_load(engines[name], prompts, clients, args.requests, args.new_tokens)

    try:
        for name in models:  # warm-up
            load(name, 2)
        rounds: dict[str, dict[int, list[dict]]] = {n: {c: [] for c in levels} for n in models}
        for r in range(args.rounds):
            for c in levels:
                for name in models:
                    rounds[name][c].append(load(name, c))
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for engine in engines.values():
            engine.close()
        for server in servers.values():
            server.stop()
        if clients_process is not None:
            clients_process.shutdown()

    for name in models:
        results["runs"][name] = {}
        for c in levels:
            runs = sorted(rounds[name][c], key=lambda x: x["tokens_per_s"])
            results["runs"][name][str(c)] = runs[len(runs) // 2] | {
                "rounds_tokens_per_s": [x["tokens_per_s"] for x in rounds[name][c]]
            }

    # Decode at batch 1 on the model alone, interleaved rounds, on a worker thread like the engine's
    # (the main thread's OpenMP team behaves differently, see docs/serving.md).
    steps = {name: [] for name in models}
    prefills = {name: [] for name in models}

    # NOTE: 128 steps per round (or what the context allows). The first 4 steps after switching
    # models run on the other model's caches (measured 9% slower for the MoE, 4.5% for the dense
    # twin); over 48 steps that is 0.3% of the mean, over 128 about 0.1%.
    decode_steps = max(1, min(128, models["moe"].cfg.max_seq_len - args.prompt_tokens - 1))

    def model_level() -> None:
        for _ in range(max(args.rounds, 3) * 4):
            for name, model in models.items():
                steps[name].append(decode_step_s(model, args.prompt_tokens, decode_steps))
                prefills[name].append(prefill_s(model, args.prompt_tokens, 16))
        if args.device == "cpu":  # the diagnostic calls the fp32 CPU grouped_mm directly
            results["unchosen_experts"] = unchosen_expert_diagnostic(models["moe"], models["dense-active"])

    worker = threading.Thread(target=model_level)
    worker.start()
    worker.join()
    decode = {name: 1.0 / statistics.median(v) for name, v in steps.items()}
    results["decode_batch1_tokens_per_s"] = decode

    print(
        f"\n{'model':13s} {'total':>7s} {'active':>7s} {'conc':>5s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'tok p50':>8s} {'tok p99':>8s}"
    )
    for name in models:
        info = results["models"][name]
        for c in levels:
            run = results["runs"][name][str(c)]
            print(
                f"{name:13s} {info['total_params'] / 1e6:6.2f}M {info['active_params'] / 1e6:6.2f}M {c:5d} {run['tokens_per_s']:8.1f} "
                f"{run['ttft_p50_s'] * 1e3:7.1f}ms {run['ttft_p99_s'] * 1e3:7.1f}ms {run['tpot_p50_s'] * 1e3:6.1f}ms {run['tpot_p99_s'] * 1e3:6.1f}ms"
            )
    lo, hi = str(min(levels)), str(max(levels))
    scaling = {
        name: results["runs"][name][hi]["tokens_per_s"] / results["runs"][name][lo]["tokens_per_s"] for name in models
    }
    results["throughput_scaling"] = scaling
    # NOTE: the ratio is the median of the per-round ratios (each round times the models one after
    # the other), not a ratio of medians: a slow phase of a shared machine then slows both sides of
    # a pair instead of one model's median.
    paired = {
        other: sorted(b / a for a, b in zip(steps["moe"], steps[other])) for other in ("dense-active", "dense-total")
    }
    ratio_active = statistics.median(paired["dense-active"])
    ratio_total = statistics.median(paired["dense-total"])
    results["decode_batch1_paired_ratios"] = paired
    # prefill: MoE time / dense time per round (above 1: the MoE is slower)
    prefill_paired = sorted(a / b for a, b in zip(prefills["moe"], prefills["dense-active"]))
    prefill_ratio = statistics.median(prefill_paired)
    results["prefill_s"] = {name: statistics.median(v) for name, v in prefills.items()}
    results["prefill_paired_time_ratios"] = prefill_paired
    results["targets"] = {
        f"moe_throughput_c{hi}_over_c{lo}": scaling["moe"],
        "moe_decode_b1_over_dense_active": ratio_active,
        "moe_decode_b1_over_dense_total": ratio_total,
        "moe_prefill_time_over_dense_active": prefill_ratio,
    }
    print(
        f"\nthroughput at concurrency {hi} / {lo}: "
        + ", ".join(f"{n} {s:.1f}x" for n, s in scaling.items())
        + "   (target for the MoE: >= 3x)"
    )
    print("decode at batch 1, model alone: " + ", ".join(f"{n} {v:.0f} tok/s" for n, v in decode.items()))
    spread = paired["dense-active"]
    print(
        f"MoE / dense-active (same active compute): {ratio_active:.2f}x, median of {len(spread)} paired rounds "
        f"(range {spread[0]:.2f}-{spread[-1]:.2f})   (target >= 0.95x)"
    )
    print(f"MoE / dense-total (same total parameters): {ratio_total:.2f}x")
    print(
        f"prefill of a {args.prompt_tokens}-token prompt, model alone: "
        + ", ".join(f"{n} {v * 1e3:.2f} ms" for n, v in results["prefill_s"].items())
        + f"; MoE / dense-active time {prefill_ratio:.2f}x, median of {len(prefill_paired)} paired rounds "
        f"(range {prefill_paired[0]:.2f}-{prefill_paired[-1]:.2f})   (target <= 1.2x)"
    )
    d = results.get("unchosen_experts")
    if d:
        print(
            f"one layer at one token: MoE {d['moe_layer_us']:.0f} us (PyTorch path {d['moe_layer_pytorch_path_us']:.0f} us, "
            f"its router {d['router_us']:.0f} us) vs dense FFN {d['dense_ffn_us']:.0f} us; "
            f"grouped_mm over all {d['experts']} experts ({d['experts'] - d['top_k']} empty) {d['grouped_mm_all_groups_us']:.0f} us "
            f"vs over the {d['top_k']} chosen {d['grouped_mm_chosen_groups_us']:.0f} us"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
