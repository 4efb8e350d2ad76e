"""The training loop: AdamW + schedule, gradient accumulation, MoE losses and bias balancing,
evaluation, metrics, checkpoints, budgets, and the monitor's guardrails (including rollback)."""

from __future__ import annotations

import json
import math
import platform
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moelab.checkpoint import (
    describe_fallback,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from moelab.config import RunConfig
from moelab.data.loader import BatchLoader, eval_batches
from moelab.data.shards import TokenData, prepare_data
from moelab.data.tokenizer import TextTokenizer
from moelab.device import peak_memory_bytes, resolve_device
from moelab.distributed import Distributed
from moelab.distributed import wanted as distributed_wanted
from moelab.errors import CheckpointError, MoelabError
from moelab.files import read_jsonl, write_atomic
from moelab.model import Transformer
from moelab.model.accounting import param_counts, train_flops_per_token
from moelab.model.health import router_health
from moelab.rundir import RunDir
from moelab.train.monitor import Alert, Monitor
from moelab.train.progress import ProgressBar, format_count, format_duration
from moelab.train.schedule import build_optimizer, learning_rate, set_learning_rate

# (model, tokenizer, tokens, seed) -> a short text sample drawn at the end of a run
Sampler = Callable[[Transformer, TextTokenizer, int, int], str]


@dataclass
class TrainResult:
    run_dir: str
    step: int
    tokens: int
    flops: float
    val_loss: float
    val_ppl: float
    train_s: float
    wall_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    stopped_by: str  # max_steps | max_tokens | max_minutes | stop_at | monitor
    sample: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fresh_start_state(source: str) -> dict[str, Any]:
    """trainer.pt of a checkpoint written outside training (`moelab import`, `moelab upcycle`): weights
    only. `moelab train --resume` continues from it as a new run would start: step 0, a fresh
    optimizer, and the data order and RNG of train.seed (see Trainer._fresh_state)."""
    return {"fresh_start": True, "step": 0, "source": source}


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless bfloat16 is asked for."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bfloat16" else None


@dataclass
class IntervalTotals:
    """What the steps since the last logging interval add up to."""

    loss: float = 0.0
    aux: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0

    def add(self, loss: float, aux: float, seconds: float, tokens: int) -> None:
        self.loss += loss
        self.aux += aux
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens


class Trainer:
    """Train one run. `resume` is False, True (newest checkpoint) or a checkpoint path."""

    def __init__(
        self,
        cfg: RunConfig,
        out: str | Path,
        resume: bool | str | Path = False,
        log: Callable[[str], None] = print,
        progress: bool = True,
        step_hook: Callable[["Trainer", int], None] | None = None,
        checkpoint_steps: frozenset[int] = frozenset(),
        sampler: Sampler | None = None,
    ):
        self.cfg = cfg
        self.run = RunDir(out)
        # NOTE: the end-of-run sample is drawn by a function the caller gives (the CLI gives
        # moelab.infer.generate.training_sample), so training does not depend on inference.
        self.sampler = sampler
        # Extra checkpoints kept whatever keep_checkpoints says (compare's cooldown branches start there).
        self.checkpoint_steps = frozenset(checkpoint_steps)
        # (distributed) under torchrun: check the layout, join the process group; rank 0 alone logs,
        # draws the progress bar and writes files (moelab.distributed, docs/distributed.md).
        self.parallel = Distributed.from_env(cfg) if distributed_wanted(cfg) else None
        if self.parallel is not None:  # rank 0's run directory for all (a default --out has the time in it)
            self.run = RunDir(self.parallel.broadcast(str(self.run.path)))
        self.is_main = self.parallel is None or self.parallel.is_main
        if not self.is_main:
            log, progress = (lambda s: None), False
        self.log = log
        self.step_hook = step_hook
        self.device = self.parallel.device if self.parallel is not None else resolve_device(cfg.train.device)
        if self.parallel is not None:
            self.log(self.parallel.describe())
        self.amp_dtype = autocast_dtype(cfg.train.dtype, self.device)
        resume_from = self._resume_checkpoint(resume)
        if resume_from is None and self.run.path.exists():
            self.run.check_free()  # before the data work, so a mistake costs nothing
        if self.parallel is not None:
            self.parallel.main_first_begin()  # (distributed) rank 0 fills the token cache and creates the run first

        self.data: TokenData = prepare_data(cfg.data, log=log)
        vocab = self.data.tokenizer.vocab_size
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size < vocab:
            raise MoelabError(
                f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's {vocab} tokens"
            )
        # (distributed) train.batch_size is the global batch: each rank reads its share of every batch.
        rank, world = (self.parallel.rank, self.parallel.world) if self.parallel is not None else (0, 1)
        self.loader = BatchLoader(
            self.data.train, cfg.train.batch_size // world, cfg.data.seq_len, cfg.train.seed, rank=rank, world=world
        )
        self.eval_set = eval_batches(self.data.val, cfg.train.batch_size, cfg.data.seq_len, cfg.train.eval_batches)

        if resume_from is None:
            if self.is_main:
                self.run.create(cfg)
                self.data.tokenizer.save(self.run.tokenizer_path)
                write_atomic(self.run.data_path, json.dumps(self.data.meta, indent=1))
        elif self.run.load_tokenizer().to_json() != self.data.tokenizer.to_json():
            raise MoelabError(
                f"the data's tokenizer differs from the one in {self.run.path}: the data changed since the run started"
            )
        if self.parallel is not None:
            self.parallel.main_first_end()

        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.model = Transformer(cfg.model)
        self.train_model: torch.nn.Module = self.model  # what training forwards call (distributed: the DDP wrapper)
        if self.parallel is not None:
            self.parallel.shard(self.model)  # (distributed) this rank's experts only, before moving to the device
            self.parallel.seed_rank(cfg.train.seed)
        self.model.to(self.device)
        if self.parallel is not None:
            self.train_model = self.parallel.wrap(self.model)
        self.optimizer = build_optimizer(self.model, cfg.train)
        moe = cfg.model.moe
        self.monitor = Monitor(cfg.monitor, moe.num_experts if moe else 0, moe.top_k if moe else 1)
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum
        self.step = 0
        self.tokens = 0
        self.train_s = 0.0  # time in training steps (no evaluation or checkpointing)
        self.wall_s = 0.0  # all time spent in this run, over every session
        self.last_val: float | None = None
        self.nan_injected = False
        self.alerts_total = 0
        if resume_from is not None:
            self._load(resume_from)
            self.log(f"resumed {self.run.path} from {resume_from.name} (step {self.step})")
            self._truncate_metrics(self.step)
        self.bar = ProgressBar(cfg.train.max_steps, enabled=progress)

    # -- setup helpers -----------------------------------------------------------------------

    def _resume_checkpoint(self, resume: bool | str | Path) -> Path | None:
        if resume is False or resume is None:
            return None
        if resume is True:
            if not self.run.is_run():
                raise MoelabError(f"cannot resume: {self.run.path} is not a moelab run directory")
            checkpoints = self._list_checkpoints()
            if not checkpoints:
                raise MoelabError(f"cannot resume: run {self.run.path} has no checkpoint")
            return checkpoints[-1]
        path = Path(resume)
        if not path.is_dir():
            raise MoelabError(f"cannot resume from {path}: no such checkpoint directory")
        if path.parent.parent.resolve() != self.run.path.resolve():
            raise MoelabError(f"checkpoint {path} does not belong to run {self.run.path}")
        return path

    def _list_checkpoints(self) -> list[Path]:
        """(distributed) rank 0's listing for every rank: what follows (evaluate, save, roll back)
        must be the same on all of them, whatever a shared filesystem's caches show each node."""
        found = list_checkpoints(self.run.path)
        return found if self.parallel is None else self.parallel.broadcast(found)

    def _trainer_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "train_s": self.train_s,
            "wall_s": self.wall_s,
            "last_val": -1.0 if self.last_val is None else self.last_val,
            "nan_injected": self.nan_injected,
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": json.dumps(random.getstate()),
            "monitor": self.monitor.state_dict(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def _load(self, checkpoint: Path, restore_counters: bool = True) -> None:
        try:
            if self.parallel is not None:  # (distributed) this rank's experts of the full checkpoint
                state = self.parallel.load_checkpoint(checkpoint, self.model)
            else:
                state = load_checkpoint(checkpoint, self.model, map_location="cpu")  # RNG states must stay on the CPU
        except CheckpointError as exc:
            raise CheckpointError(str(exc) + describe_fallback(self.run.path, checkpoint)) from None
        self.model.to(self.device)
        if state.get("fresh_start"):
            state = self._fresh_state()  # a weights-only checkpoint (moelab import / upcycle)
        if self.parallel is not None:  # (distributed) this rank's optimizer shard, data position and RNG
            state = self.parallel.local_trainer_state(
                state, self.optimizer, self.model, self.loader.batch_size, self.cfg.train.seed
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        python_state = json.loads(state["python_rng"])
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.last_val = None if state["last_val"] < 0 else float(state["last_val"])
        self.nan_injected = bool(state.get("nan_injected", False))
        if restore_counters:
            self.train_s = float(state["train_s"])
            self.wall_s = float(state["wall_s"])
            rollbacks = self.monitor.rollbacks
            self.monitor.load_state_dict(state["monitor"])
            self.monitor.rollbacks = max(rollbacks, self.monitor.rollbacks)
        for moe in self.model.moe_layers():
            moe.reset_stats()
            moe.load_since_update.zero_()

    def _fresh_state(self) -> dict[str, Any]:
        """The trainer state of a new run at step 0 (fresh optimizer, data order and RNG from
        train.seed): what a checkpoint written by `fresh_start_state` resumes into."""
        moe = self.cfg.model.moe
        return {
            "step": 0,
            "tokens": 0,
            "train_s": 0.0,
            "wall_s": 0.0,
            "last_val": -1.0,
            "optimizer": build_optimizer(self.model, self.cfg.train).state_dict(),
            "loader": {**self.loader.state_dict(), "epoch": 0, "index": 0},
            "torch_rng": torch.Generator().manual_seed(self.cfg.train.seed).get_state(),
            "python_rng": json.dumps(random.Random(self.cfg.train.seed).getstate()),
            "monitor": Monitor(self.cfg.monitor, moe.num_experts if moe else 0, moe.top_k if moe else 1).state_dict(),
        }

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines newer than the checkpoint a resumed run restarts from."""
        if not self.is_main:
            return
        rows = [r for r in read_jsonl(self.run.metrics_path) if r.get("step", 0) <= step]
        write_atomic(self.run.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    # -- the loop ----------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.run.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _write_alert(self, alert: Alert) -> None:
        self.alerts_total += 1
        if self.is_main:
            with open(self.run.alerts_path, "a") as f:
                f.write(json.dumps(alert.to_dict()) + "\n")
        row = {
            "step": alert.step,
            "tokens": self.tokens,
            "event": "alert",
            "rule": alert.rule,
            "action": alert.action,
            "message": alert.message,
        }
        if alert.layer is not None:
            row["layer"] = alert.layer  # diagnose reads it; older runs had only the message text
        self._write_metrics(row)
        self.bar.message(f"alert [{alert.rule} -> {alert.action}] {alert.message}")

    def _monitor_stop(self, alert: Alert) -> None:
        """(monitor) Say why the monitor stops the run, also in --quiet runs and in metrics.jsonl."""
        text = f"stopping: {alert.message}"
        if alert.action == "rollback":
            text += f"; rollback retries exhausted ({self.monitor.rollbacks} of monitor.max_rollbacks = {self.cfg.monitor.max_rollbacks} used)"
        self._write_metrics(
            {"step": self.step, "tokens": self.tokens, "event": "stop", "rule": alert.rule, "message": text}
        )
        if self.bar.enabled:
            self.bar.message(text)
        else:
            self.log(text)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross-entropy over the fixed evaluation batches."""
        self.model.eval()
        total, count = 0.0, 0
        for x, y in self.eval_set:
            counted = True
            if self.parallel is not None:  # (distributed) each rank evaluates its share of the rows
                x, y, counted = self.parallel.eval_rows(x, y)
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.model(x).logits
            if counted:
                total += float(
                    F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
                )
                count += y.numel()
        self.model.train()
        if self.parallel is not None:
            total, count = self.parallel.sum(total, count)
        return total / count

    def _eval_and_log(self) -> float:
        val = self.evaluate()
        self.last_val = val
        self._write_metrics(
            {
                "step": self.step,
                "tokens": self.tokens,
                "flops": self.tokens * self.flops_per_token,
                "val_loss": val,
                "val_ppl": math.exp(min(val, 50.0)),
                "train_s": round(self.train_s, 3),
                "elapsed_s": round(self.wall_s, 3),
            }
        )
        return val

    def _forward_backward(self) -> tuple[float, float]:
        cfg = self.cfg.train
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for i in range(cfg.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # (distributed) DDP reduces the gradients once, in the backward of the last micro-batch
            sync = (
                self.parallel.no_sync(self.train_model, i == cfg.grad_accum - 1)
                if self.parallel is not None
                else nullcontext()
            )
            with sync, self._autocast():
                out = self.train_model(x)
            loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
            if (
                self.cfg.monitor.debug_nan_step
                and not self.nan_injected
                and self.step + 1 == self.cfg.monitor.debug_nan_step
            ):
                loss = loss * float("nan")  # test hook: a poisoned batch
                self.nan_injected = True
            ((loss + out.aux_loss) / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            aux_sum += out.aux_loss.detach()
        loss_mean, aux_mean = float(loss_sum) / cfg.grad_accum, float(aux_sum) / cfg.grad_accum
        if self.parallel is not None:  # (distributed) expert gradients over their copies; losses averaged over ranks
            self.parallel.finish_backward(self.model)
            loss_mean, aux_mean = self.parallel.mean(loss_mean, aux_mean)
        return loss_mean, aux_mean

    def _act_on(self, alert: Alert) -> bool:
        """Carry out an alert's stop or rollback action; True when the run must stop (a stop, or a
        rollback whose retries are spent or that has no checkpoint to go back to)."""
        if alert.action == "rollback" and self._rollback(alert):
            return False
        self._monitor_stop(alert)
        return True

    def _rollback(self, alert: Alert) -> bool:
        """Restore the newest good checkpoint and skip the batches that led to the failure.
        Returns False when the retry budget is spent."""
        if self.monitor.rollbacks >= self.cfg.monitor.max_rollbacks:
            return False
        checkpoints = self._list_checkpoints()
        if not checkpoints:
            return False
        self.monitor.rollbacks += 1
        bad_loader = self.loader.state_dict()
        bad_step = self.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        wall_s, train_s = self.wall_s, self.train_s
        nan_injected = self.nan_injected
        self._load(checkpoints[-1], restore_counters=False)
        self.wall_s, self.train_s = wall_s, train_s  # time already spent stays spent
        # NOTE (monitor): the debug_nan_step hook stands for one poisoned batch, which the rollback
        # skips; restoring the checkpoint's flag would poison the replayed step again every retry.
        self.nan_injected = nan_injected
        # Continue after the batch that failed: the window since the checkpoint is skipped.
        self.loader.epoch, self.loader.index = bad_loader["epoch"], bad_loader["index"]
        self.loader.skip(self.cfg.monitor.skip_batches)
        self._write_metrics(
            {"step": bad_step, "tokens": self.tokens, "event": "rollback", "to_step": self.step, "rule": alert.rule}
        )
        self.bar.message(
            f"rolled back to step {self.step} ({checkpoints[-1].name}); skipping the batches up to step {bad_step} (retry {self.monitor.rollbacks}/{self.cfg.monitor.max_rollbacks})"
        )
        return True

    def _checkpoint(self) -> None:
        if self.parallel is not None:  # (distributed) experts gathered to rank 0, the single-process format
            state = self._trainer_state()
            self.parallel.save_checkpoint(
                self.run.path,
                self.step,
                self.model,
                self.optimizer,
                state,
                self.cfg.train.keep_checkpoints,
                self.checkpoint_steps,
            )
            return
        save_checkpoint(
            self.run.path,
            self.step,
            self.model,
            self._trainer_state(),
            self.cfg.train.keep_checkpoints,
            self.checkpoint_steps,
        )

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until max_steps, a budget, `stop_at` steps, or a monitor stop; always ends with an
        evaluation and a checkpoint so the run can be resumed or served."""
        cfg = self.cfg.train
        session_start = time.perf_counter()
        wall_at_start = self.wall_s
        stopped_by = "max_steps"
        self.model.train()
        counts = param_counts(self.cfg.model)
        self.log(
            f"model: {format_count(counts.total)} parameters, {format_count(counts.active)} active; "
            f"{format_count(self.flops_per_token)} training FLOPs/token; device {self.device}"
            + (f" (autocast {self.amp_dtype})" if self.amp_dtype else "")
        )
        # NOTE: also after resuming a weights-only checkpoint (step 0, never evaluated), so its
        # metrics start with the step-0 loss and step 0 gets a complete checkpoint.
        if self.step == 0 and (not self._list_checkpoints() or self.last_val is None):
            self._eval_and_log()
            self._checkpoint()  # a rollback target from the very start
        interval = IntervalTotals()
        grad_norm = 0.0
        while self.step < cfg.max_steps:
            if stop_at is not None and self.step >= stop_at:
                stopped_by = "stop_at"
                break
            if cfg.max_tokens and self.tokens >= cfg.max_tokens:
                stopped_by = "max_tokens"
                break
            self.wall_s = wall_at_start + time.perf_counter() - session_start
            out_of_time = bool(cfg.max_minutes) and self.wall_s >= cfg.max_minutes * 60
            if self.parallel is not None and cfg.max_minutes:  # (distributed) all ranks stop at the same step
                out_of_time = self.parallel.any(out_of_time)
            if out_of_time:
                stopped_by = "max_minutes"
                break
            if self.step_hook is not None:
                self.step_hook(self, self.step)
            t0 = time.perf_counter()
            set_learning_rate(self.optimizer, learning_rate(self.step, cfg))
            loss, aux = self._forward_backward()
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            if self.parallel is not None:  # (distributed) the norm of the whole model's gradient
                grad_norm = self.parallel.clip_grad_norm(self.model, clip)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
            alert = self.monitor.check_step(self.step + 1, loss, grad_norm)
            if alert is not None:
                self._write_alert(alert)
                self.optimizer.zero_grad(set_to_none=True)  # the step is skipped
                for moe in self.model.moe_layers():
                    moe.load_since_update.zero_()
                if alert.action != "warn" and self._act_on(alert):
                    stopped_by = "monitor"
                    break
                interval = IntervalTotals()
                continue
            log_now = (self.step + 1) % cfg.log_every == 0
            if self.parallel is not None:  # (distributed) statistics of the global batch, experts gathered
                health = self.parallel.router_health(self.model, self.cfg.monitor.expert_similarity) if log_now else {}
            else:
                health = (
                    router_health(self.model, self.model.router_stats(), self.cfg.monitor.expert_similarity)
                    if log_now
                    else {}
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.parallel is not None:  # (distributed) the update the global load calls for
                self.parallel.update_router_biases(self.model)
            else:
                self.model.update_router_biases()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.step += 1
            self.tokens += self.tokens_per_step
            self.train_s += dt
            interval.add(loss, aux, dt, self.tokens_per_step)
            self.wall_s = wall_at_start + time.perf_counter() - session_start
            if log_now:
                tps = interval.tokens / max(interval.seconds, 1e-9)
                record = {
                    "step": self.step,
                    "tokens": self.tokens,
                    "flops": self.tokens * self.flops_per_token,
                    "loss": interval.loss / interval.steps,
                    "aux_loss": interval.aux / interval.steps,
                    "lr": learning_rate(self.step - 1, cfg),
                    "grad_norm": grad_norm,
                    "tokens_per_s": tps,
                    "train_s": round(self.train_s, 3),
                    "elapsed_s": round(self.wall_s, 3),
                }
                alerts = self.monitor.check_interval(self.step, record["loss"], grad_norm, health)
                record.update(health)
                self._write_metrics(record)
                stop_alert = None
                for a in alerts:
                    self._write_alert(a)
                    if a.action in ("stop", "rollback") and stop_alert is None:
                        stop_alert = a
                eta = (cfg.max_steps - self.step) * interval.seconds / interval.steps
                latest = alerts[-1].rule if alerts else ""
                self.bar.update(self.step, record["loss"], tps, eta, self.last_val, latest)
                interval = IntervalTotals()
                if stop_alert is not None:
                    if self._act_on(stop_alert):
                        stopped_by = "monitor"
                        break
                    continue
            if self.step % cfg.eval_every == 0:
                val = self._eval_and_log()
                self.bar.message(
                    f"step {self.step}: validation loss {val:.4f} (perplexity {math.exp(min(val, 50)):.2f})"
                )
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step in self.checkpoint_steps:
                self._checkpoint()
        self.bar.close()
        self.wall_s = wall_at_start + time.perf_counter() - session_start
        if self.step % cfg.eval_every != 0 or self.last_val is None:
            self._eval_and_log()
        latest = self._list_checkpoints()
        if not latest or int(latest[-1].name.split("_")[1]) != self.step:
            self._checkpoint()
        sample = ""
        # (distributed) rank 0 samples when it holds every expert; under expert parallelism a forward
        # needs every rank, so no sample (use `moelab generate` on the checkpoint).
        if (
            cfg.sample_tokens
            and self.sampler is not None
            and (self.parallel is None or (self.is_main and self.parallel.full_model_here))
        ):
            sample = self.sampler(self.model, self.data.tokenizer, cfg.sample_tokens, cfg.seed)
        result = TrainResult(
            run_dir=str(self.run.path),
            step=self.step,
            tokens=self.tokens,
            flops=self.tokens * self.flops_per_token,
            val_loss=self.last_val,
            val_ppl=math.exp(min(self.last_val, 50.0)),
            train_s=self.train_s,
            wall_s=self.wall_s,
            tokens_per_s=self.tokens / max(self.train_s, 1e-9),
            peak_memory_bytes=peak_memory_bytes(self.device),
            stopped_by=stopped_by,
            sample=sample,
        )
        summary = result.to_dict()
        summary.update(
            {
                "params": counts.to_dict(),
                "train_flops_per_token": self.flops_per_token,
                "alerts": self.alerts_total,
                "rollbacks": self.monitor.rollbacks,
                "device": str(self.device),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": torch.get_num_threads(),
            }
        )
        if self.parallel is not None:
            summary["parallel"] = {"world": self.parallel.world, "expert": self.cfg.parallel.expert}
        if self.is_main:
            write_atomic(self.run.summary_path, json.dumps(summary, indent=1))
        if self.parallel is not None:
            self.parallel.barrier()  # (distributed) the run is complete on disk when any rank returns
        return result


def describe_result(result: TrainResult) -> str:
    return (
        f"finished at step {result.step} ({result.stopped_by}): validation loss {result.val_loss:.4f}, "
        f"perplexity {result.val_ppl:.2f}; {format_count(result.tokens)} tokens in {format_duration(result.train_s)} "
        f"({format_count(result.tokens_per_s)} tokens/s); run directory {result.run_dir}"
    )
