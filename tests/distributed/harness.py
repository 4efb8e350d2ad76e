"""Run a function in W fresh processes joined by a gloo process group on 127.0.0.1.

Workers use one thread each (the test machine has 2 cores), return plain Python values, and a hung
collective fails the test after `timeout` seconds instead of hanging it. Launching through torchrun
is tested separately (test_torchrun.py); this is the in-process API path.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=90)
        )
        out = fn(rank, world, *args)
        results.put((rank, "ok", out))
    except BaseException:  # report every failure to the parent, which fails the test
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn: Callable, world: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """fn(rank, world, *args) in `world` processes; returns the results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children at start
    try:
        procs = [
            ctx.Process(target=_entry, args=(r, world, port, fn, args, results), daemon=True) for r in range(world)
        ]
        for p in procs:
            p.start()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    deadline = time.monotonic() + timeout
    got: dict[int, Any] = {}
    errors: list[str] = []
    try:
        while len(got) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"distributed workers timed out after {timeout:.0f}s ({len(got)} of {world} finished)")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    time.sleep(0.5)
                    if results.empty():
                        pytest.fail(f"a distributed worker died with exit code {dead[0].exitcode}")
                continue
            if status == "ok":
                got[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break  # the others may now wait forever in a collective
        if errors:
            pytest.fail("distributed worker failed\n" + "\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [got[r] for r in range(world)]


def torchrun(args: list[str], nproc: int, timeout: float = 240.0) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc ARGS` on 127.0.0.1, one thread per worker. On a timeout the
    whole process group it started (the launcher and its workers) is stopped and the test fails."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout:.0f}s: {' '.join(cmd)}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
