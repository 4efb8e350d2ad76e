"""The training loop: AdamW + schedule, gradient accumulation, MoE losses and bias balancing,
evaluation, budgets, and the monitor's guardrails (including rollback), over the parts that keep
state (moelab.train.checkpointer), write logs and feed the experiment trackers
(moelab.train.metrics_log, moelab.train.trackers) and span processes (moelab.train.runtime)."""

from __future__ import annotations

import json
import math
import platform
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moelab.checkpoint import list_checkpoints, remove_stale_temporaries
from moelab.config import RunConfig
from moelab.data.loader import BatchLoader, eval_batches
from moelab.data.shards import TokenData, prepare_data
from moelab.data.tokenizer import TextTokenizer
from moelab.device import check_fits, peak_memory_bytes
from moelab.errors import MoelabError
from moelab.files import write_atomic
from moelab.model import Transformer
from moelab.model.accounting import memory_estimate_bytes, param_counts, train_flops_per_token
from moelab.model.compiling import compile_problem
from moelab.model.health import LayerHealth, health_to_metrics
from moelab.rundir import RunDir
from moelab.train.checkpointer import Checkpointer, Counters, new_monitor
from moelab.train.metrics_log import IntervalTotals, MetricsLog
from moelab.train.monitor import Alert
from moelab.train.progress import ProgressBar, format_count, format_duration
from moelab.train.runtime import runtime_for
from moelab.train.schedule import (
    balance_scale,
    build_optimizer,
    learning_rate,
    router_frozen,
    set_learning_rate,
    undecayed_learning_rate,
)
from moelab.train.trackers import require_trackers

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


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless bfloat16 is asked for."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bfloat16" else None


@dataclass
class StepOutcome:
    """What one training step produced: its losses, the clipped gradient norm, its duration, the
    router health of a logging step (else empty), and the alert that rejected it (then no update)."""

    loss: float
    aux: float
    grad_norm: float
    seconds: float
    health: dict[int, LayerHealth]
    alert: Alert | None
    extra: dict[str, float] = field(default_factory=dict)  # logged with the interval (balance_loss)


class Trainer:
    """Train one run. `resume` is False, True (newest checkpoint) or a checkpoint path.

    The parts: a runtime (one process or torchrun's; moelab.train.runtime), the checkpointer (every
    piece of state a resume or rollback restores; moelab.train.checkpointer), the metrics log and
    its trackers (moelab.train.metrics_log, moelab.train.trackers) and the monitor
    (moelab.train.monitor). `fit` is the loop over them: a step, an interval log, the alerts'
    actions, the scheduled evaluations and checkpoints."""

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
        require_trackers(cfg.train.report_to)  # a missing package is named before any work
        # NOTE: the end-of-run sample is drawn by a function the caller gives (the CLI gives
        # moelab.infer.generate.training_sample), so training does not depend on inference.
        self.sampler = sampler
        self.step_hook = step_hook
        # Under torchrun: the layout checked, the process group joined; rank 0 alone logs, draws the
        # progress bar and writes files, and its run directory (a default --out has the time in it) is everyone's.
        self.runtime = runtime_for(cfg)
        self.run = RunDir(self.runtime.broadcast(str(RunDir(out).path)))
        self.is_main = self.runtime.is_main
        if not self.is_main:
            log, progress = (lambda s: None), False
        self.log = log
        if description := self.runtime.describe():
            self.log(description)
        self.device = self.runtime.device
        if cfg.train.compile and (problem := compile_problem(self.device)):
            # before the data work and the run directory: a refusal leaves nothing behind
            raise MoelabError(
                f"train.compile = true cannot run on {self.device.type} here: {problem}; set train.compile = false"
            )
        self.amp_dtype = autocast_dtype(cfg.train.dtype, self.device)
        self.metrics = MetricsLog(self.run, enabled=self.is_main)
        if self.is_main and (stale := remove_stale_temporaries(self.run.path)):
            self.log(f"removed {len(stale)} unfinished checkpoint write(s) from an earlier crash: {stale[0].name}")
        self.restart_in_place = False  # a run that stopped before its first checkpoint starts again
        resume_from = self._resume_checkpoint(resume)
        self.resumed = resume_from is not None
        self._prepare_data(resume_from)
        self._build_model()
        self.monitor = new_monitor(cfg)
        self.checkpointer = Checkpointer(
            cfg,
            self.run,
            self.runtime,
            self.model,
            self.optimizer,
            self.loader,
            self.monitor,
            frozenset(checkpoint_steps),
        )
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum
        self.counters = Counters()
        if resume_from is not None:
            self.checkpointer.restore(resume_from, self.counters)
            self.log(f"resumed {self.run.path} from {resume_from.name} (step {self.step})")
            self.metrics.truncate(self.step)
        self.bar = ProgressBar(cfg.train.max_steps, enabled=progress)

    @property
    def step(self) -> int:
        return self.counters.step

    # -- setup -------------------------------------------------------------------------------

    def _resume_checkpoint(self, resume: bool | str | Path) -> Path | None:
        if resume is False or resume is None:
            self.run.check_free()  # before the data work, so a mistake costs nothing
            return None
        if resume is True:
            if not self.run.is_run():
                raise MoelabError(f"cannot resume: {self.run.path} is not a moelab run directory")
            checkpoints = self.runtime.broadcast(list_checkpoints(self.run.path))
            if not checkpoints:
                # NOTE: it stopped before its first checkpoint (written at step 0): nothing was
                # trained, so it starts again from step 0 in the same directory.
                self.log(
                    f"run {self.run.path} has no checkpoint (it stopped before its first): starting it from step 0"
                )
                self.restart_in_place = True
                return None
            return checkpoints[-1]
        path = Path(resume)
        if not path.is_dir():
            raise MoelabError(f"cannot resume from {path}: no such checkpoint directory")
        if path.parent.parent.resolve() != self.run.path.resolve():
            raise MoelabError(f"checkpoint {path} does not belong to run {self.run.path}")
        return path

    def _prepare_data(self, resume_from: Path | None) -> None:
        """Tokenised data, the loader (each rank reads its share of the global batch), the fixed
        evaluation batches, and a new run's directory. (distributed) rank 0 fills the token cache and
        creates the run first; the others wait and read."""
        cfg = self.cfg
        self.runtime.main_first_begin()
        self.data: TokenData = prepare_data(cfg.data, log=self.log)
        vocab = self.data.tokenizer.vocab_size
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size < vocab:
            raise MoelabError(
                f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's {vocab} tokens"
            )
        rank, world = self.runtime.rank, self.runtime.world
        if self.device.type == "cpu":  # before the run directory exists: a refusal leaves nothing behind
            needed = memory_estimate_bytes(cfg.model, cfg.train.batch_size // world, cfg.data.seq_len)["total"]
            check_fits(
                needed, f"training this model (model.d_model = {cfg.model.d_model}, {cfg.model.n_layers} layers)"
            )
        self.loader = BatchLoader(
            self.data.train, cfg.train.batch_size // world, cfg.data.seq_len, cfg.train.seed, rank=rank, world=world
        )
        self.eval_set = eval_batches(self.data.val, cfg.train.batch_size, cfg.data.seq_len, cfg.train.eval_batches)
        if resume_from is None:
            if self.is_main:
                self.run.create(cfg, replace_unstarted=self.restart_in_place)
                self.data.tokenizer.save(self.run.tokenizer_path)
                write_atomic(self.run.data_path, json.dumps(self.data.meta, indent=1))
        elif self.run.load_tokenizer().to_json() != self.data.tokenizer.to_json():
            raise MoelabError(
                f"the data's tokenizer differs from the one in {self.run.path}: the data changed since the run started"
            )
        self.runtime.main_first_end()

    def _build_model(self) -> None:
        seed = self.cfg.train.seed
        torch.manual_seed(seed)
        random.seed(seed)
        self.model = Transformer(self.cfg.model)
        self.runtime.shard(self.model)  # (distributed) this rank's experts only, before moving to the device
        self.runtime.seed_rank(seed)
        self.model.to(self.device)
        # Training forms of the blocks (docs/distributed.md): the weights and state dict are unchanged.
        self.model.activation_checkpointing = self.cfg.train.activation_checkpointing
        if self.cfg.train.compile:
            self.model.compile_blocks()
        self.train_model: torch.nn.Module = self.runtime.wrap(self.model)  # what training forwards call (DDP)
        self.optimizer = build_optimizer(self.model, self.cfg.train)

    # -- the parts of a step -----------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _forward_backward(self) -> tuple[float, float]:
        """Gradients of one optimizer step (all micro-batches); (loss, aux loss), averaged over
        micro-batches and ranks."""
        cfg = self.cfg.train
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for i in range(cfg.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # (distributed) DDP reduces the gradients once, in the backward of the last micro-batch
            with self.runtime.no_sync(self.train_model, i == cfg.grad_accum - 1), self._autocast():
                out = self.train_model(x)
            loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
            if self.cfg.monitor.debug_nan_step == self.step + 1 and not self.counters.nan_injected:
                loss = loss * float("nan")  # test hook: a poisoned batch
                self.counters.nan_injected = True
            ((loss + out.aux_loss) / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            aux_sum += out.aux_loss.detach()
        self.runtime.finish_backward(self.model)  # (distributed) expert gradients over their copies
        loss_mean, aux_mean = self.runtime.mean(float(loss_sum) / cfg.grad_accum, float(aux_sum) / cfg.grad_accum)
        return loss_mean, aux_mean

    def _train_step(self, log_now: bool) -> StepOutcome:
        """One optimizer step, or none when the monitor rejects its loss or gradient (the alert)."""
        cfg = self.cfg.train
        t0 = time.perf_counter()
        set_learning_rate(self.optimizer, learning_rate(self.step, cfg), undecayed_learning_rate(self.step, cfg))
        self.model.set_balance_scale(balance_scale(self.step, cfg))
        self.model.start_step(balance_over_step=cfg.balance_scope == "step")
        loss, aux = self._forward_backward()
        if router_frozen(self.step, cfg):
            for moe in self.model.moe_layers():
                moe.router.weight.grad = None  # AdamW skips a parameter without a gradient: no update, no decay
        grad_norm = self.runtime.clip_grad_norm(self.model, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        alert = self.monitor.check_step(self.step + 1, loss, grad_norm)
        if alert is not None:
            self.optimizer.zero_grad(set_to_none=True)  # the step is skipped
            for moe in self.model.moe_layers():
                moe.load_since_update.zero_()
            return StepOutcome(loss, aux, grad_norm, 0.0, {}, alert)
        # (distributed) statistics of the global batch, experts gathered; after the backward and
        # before the update, so that gradient norms are what the optimizer applies
        health = self.runtime.router_health(self.model, self.cfg.monitor.expert_similarity) if log_now else {}
        if log_now and cfg.balance_scope == "step":  # (distributed) the mean over ranks is the global value
            interval_extra = {"balance_loss": self.runtime.mean(self.model.step_balance_loss())[0]}
        else:
            interval_extra = {}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.runtime.update_router_biases(self.model)  # (distributed) the update the global load calls for
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepOutcome(loss, aux, grad_norm, time.perf_counter() - t0, health, None, interval_extra)

    def _interval_record(self, interval: IntervalTotals, grad_norm: float) -> dict[str, Any]:
        c = self.counters
        return {
            "step": c.step,
            "tokens": c.tokens,
            "flops": c.tokens * self.flops_per_token,
            "loss": interval.loss / interval.steps,
            "aux_loss": interval.aux / interval.steps,
            "lr": learning_rate(c.step - 1, self.cfg.train),
            **self._balance_fields(c.step - 1),
            "grad_norm": grad_norm,
            "tokens_per_s": interval.tokens_per_s,
            "train_s": round(c.train_s, 3),
            "elapsed_s": round(c.wall_s, 3),
        }

    def _balance_fields(self, step: int) -> dict[str, Any]:
        """The balancing factor and router freeze of `step`, logged when a run uses them."""
        cfg = self.cfg.train
        if self.cfg.model.moe is None or (
            cfg.balance_coupling == "none"
            and not cfg.balance_warmup_steps
            and not cfg.router_freeze_step
            and not cfg.router_freeze_at_decay
        ):
            return {}
        return {"balance_scale": balance_scale(step, cfg), "router_frozen": router_frozen(step, cfg)}

    def _log_interval(self, interval: IntervalTotals, outcome: StepOutcome) -> Alert | None:
        """Write the interval's metrics (router health completed by the monitor's layer rules) and
        its alerts; the first alert that stops or rolls back, if any."""
        record = self._interval_record(interval, outcome.grad_norm)
        record.update(outcome.extra)
        alerts = self.monitor.check_interval(self.step, record["loss"], outcome.grad_norm, outcome.health, record)
        record.update(health_to_metrics(outcome.health))
        self.metrics.write(record)
        for alert in alerts:
            self._record_alert(alert)
        eta = (self.cfg.train.max_steps - self.step) * interval.seconds / interval.steps
        latest = alerts[-1].rule if alerts else ""
        self.bar.update(self.step, record["loss"], interval.tokens_per_s, eta, self.counters.last_val, latest)
        return next((a for a in alerts if a.action in ("stop", "rollback")), None)

    # -- alerts ------------------------------------------------------------------------------

    def _record_alert(self, alert: Alert) -> None:
        self.counters.alerts_total += 1
        self.metrics.alert(alert, self.counters.tokens)
        self.bar.message(f"alert [{alert.rule} -> {alert.action}] {alert.message}")

    def _act_on(self, alert: Alert) -> bool:
        """Carry out an alert's stop or rollback action; True when the run must stop (a stop, or a
        rollback whose retries are spent or that has no checkpoint to go back to)."""
        if alert.action == "rollback":
            failed_step = self.step + 1
            restored = self.checkpointer.roll_back(self.counters)
            if restored is not None:
                self.metrics.write(
                    {
                        "step": failed_step,
                        "tokens": self.counters.tokens,
                        "event": "rollback",
                        "to_step": self.step,
                        "rule": alert.rule,
                    }
                )
                self.bar.message(
                    f"rolled back to step {self.step} ({restored.name}); skipping the batches up to step "
                    f"{failed_step} (retry {self.monitor.rollbacks}/{self.cfg.monitor.max_rollbacks})"
                )
                return False
        text = f"stopping: {alert.message}"
        if alert.action == "rollback":
            text += (
                f"; rollback retries exhausted ({self.monitor.rollbacks} of monitor.max_rollbacks = "
                f"{self.cfg.monitor.max_rollbacks} used)"
            )
        self.metrics.write(
            {"step": self.step, "tokens": self.counters.tokens, "event": "stop", "rule": alert.rule, "message": text}
        )
        if self.bar.enabled:
            self.bar.message(text)
        else:
            self.log(text)  # also in --quiet runs
        return True

    # -- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross-entropy over the fixed evaluation batches."""
        self.model.eval()
        total, count = 0.0, 0
        for x, y in self.eval_set:
            x, y, counted = self.runtime.eval_rows(x, y)  # (distributed) each rank evaluates its share of the rows
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.model(x).logits
            if counted:
                total += float(
                    F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
                )
                count += y.numel()
        self.model.train()
        total, count = self.runtime.sum(total, count)
        return total / count

    def _eval_and_log(self) -> float:
        c = self.counters
        c.last_val, c.last_val_step = (val := self.evaluate()), c.step
        self.metrics.write(
            {
                "step": c.step,
                "tokens": c.tokens,
                "flops": c.tokens * self.flops_per_token,
                "val_loss": val,
                "val_ppl": math.exp(min(val, 50.0)),
                "train_s": round(c.train_s, 3),
                "elapsed_s": round(c.wall_s, 3),
            }
        )
        return val

    # -- the loop ----------------------------------------------------------------------------

    def _stop_reason(self, stop_at: int | None, wall_at_start: float, session_start: float) -> str | None:
        cfg, c = self.cfg.train, self.counters
        if c.step >= cfg.max_steps:
            return "max_steps"
        if stop_at is not None and c.step >= stop_at:
            return "stop_at"
        if cfg.max_tokens and c.tokens >= cfg.max_tokens:
            return "max_tokens"
        c.wall_s = wall_at_start + time.perf_counter() - session_start
        if cfg.max_minutes and self.runtime.any(c.wall_s >= cfg.max_minutes * 60):  # (distributed) same step on all
            return "max_minutes"
        return None

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until max_steps, a budget, `stop_at` steps, or a monitor stop; always ends with an
        evaluation and a checkpoint so the run can be resumed or served. The trackers of
        train.report_to receive every metrics row of the session and are closed when it ends."""
        if (finished := self._already_finished()) is not None:
            return finished
        # the first step this session logs: metrics.jsonl kept the rows up to the resumed step
        first_step = self.step + 1 if (self.resumed or self.step > 0) else 0
        with self.metrics.tracking(self.cfg, first_step, self.log):
            return self._train(stop_at)

    def _train(self, stop_at: int | None) -> TrainResult:
        cfg, c = self.cfg.train, self.counters
        session_start, wall_at_start = time.perf_counter(), c.wall_s
        self.model.train()
        self._announce()
        # NOTE: also after resuming a weights-only checkpoint (step 0, never evaluated), so its
        # metrics start with the step-0 loss and step 0 gets a complete checkpoint.
        if c.step == 0 and (not self.checkpointer.list() or c.last_val is None):
            self._eval_and_log()
            self.checkpointer.save(c)  # a rollback target from the very start
        while (stopped_by := self._stop_reason(stop_at, wall_at_start, session_start)) is None:
            if self.step_hook is not None:
                self.step_hook(self, c.step)
            log_now = (c.step + 1) % cfg.log_every == 0
            outcome = self._train_step(log_now)
            action = outcome.alert
            if action is not None:
                self._record_alert(action)
                if action.action == "warn":
                    action = None
            else:
                c.step += 1
                c.tokens += self.tokens_per_step
                c.train_s += outcome.seconds
                c.interval.add(outcome.loss, outcome.aux, outcome.seconds, self.tokens_per_step)
                c.wall_s = wall_at_start + time.perf_counter() - session_start
                if log_now:
                    action = self._log_interval(c.interval, outcome)
                    c.interval = IntervalTotals()
            if action is not None or outcome.alert is not None:
                c.interval = IntervalTotals()
                if action is not None and self._act_on(action):
                    stopped_by = "monitor"
                    break
                continue
            if c.step % cfg.eval_every == 0:
                val = self._eval_and_log()
                self.bar.message(f"step {c.step}: validation loss {val:.4f} (perplexity {math.exp(min(val, 50)):.2f})")
            if (
                cfg.checkpoint_every and c.step % cfg.checkpoint_every == 0
            ) or c.step in self.checkpointer.protected_steps:
                self.checkpointer.save(c)
        self.bar.close()
        c.wall_s = wall_at_start + time.perf_counter() - session_start
        return self._finish(stopped_by)

    def _already_finished(self) -> TrainResult | None:
        """A resumed run that had already finished (its last step evaluated and checkpointed, its
        summary written): the result as it was, with nothing evaluated, logged or written again."""
        c = self.counters
        summary = self.run.read_summary() if c.step >= self.cfg.train.max_steps else None
        if summary is None or c.last_val_step != c.step or self.checkpointer.newest_step() != c.step:
            return None
        self.log(f"run {self.run.path} finished already at step {c.step}: nothing to do")
        return TrainResult(**{name: summary[name] for name in TrainResult.__dataclass_fields__})

    def _announce(self) -> None:
        counts = param_counts(self.cfg.model)
        self.log(
            f"model: {format_count(counts.total)} parameters, {format_count(counts.active)} active; "
            f"{format_count(self.flops_per_token)} training FLOPs/token; device {self.device}"
            + (f" (autocast {self.amp_dtype})" if self.amp_dtype else "")
        )

    def _finish(self, stopped_by: str) -> TrainResult:
        """The closing evaluation and checkpoint (unless the last step had them), the sample and
        summary.json."""
        cfg, c = self.cfg.train, self.counters
        if c.last_val is None or c.last_val_step != c.step:
            self._eval_and_log()
        if self.checkpointer.newest_step() != c.step:
            self.checkpointer.save(c)
        sample = ""
        # (distributed) rank 0 samples when it holds every expert; under expert parallelism a forward
        # needs every rank, so no sample (use `moelab generate` on the checkpoint).
        if cfg.sample_tokens and self.sampler is not None and self.is_main and self.runtime.full_model_here:
            sample = self.sampler(self.model, self.data.tokenizer, cfg.sample_tokens, cfg.seed)
        result = TrainResult(
            run_dir=str(self.run.path),
            step=c.step,
            tokens=c.tokens,
            flops=c.tokens * self.flops_per_token,
            val_loss=c.last_val,
            val_ppl=math.exp(min(c.last_val, 50.0)),
            train_s=c.train_s,
            wall_s=c.wall_s,
            tokens_per_s=c.tokens / max(c.train_s, 1e-9),
            peak_memory_bytes=peak_memory_bytes(self.device),
            stopped_by=stopped_by,
            sample=sample,
        )
        summary = result.to_dict()
        summary.update(
            {
                "params": param_counts(self.cfg.model).to_dict(),
                "train_flops_per_token": self.flops_per_token,
                "alerts": c.alerts_total,
                "rollbacks": self.monitor.rollbacks,
                "device": str(self.device),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": torch.get_num_threads(),
                **self.runtime.summary(self.cfg),
            }
        )
        if self.is_main:
            write_atomic(self.run.summary_path, json.dumps(summary, indent=1))
        self.runtime.barrier()  # (distributed) the run is complete on disk when any rank returns
        return result


def describe_result(result: TrainResult) -> str:
    return (
        f"finished at step {result.step} ({result.stopped_by}): validation loss {result.val_loss:.4f}, "
        f"perplexity {result.val_ppl:.2f}; {format_count(result.tokens)} tokens in {format_duration(result.train_s)} "
        f"({format_count(result.tokens_per_s)} tokens/s); run directory {result.run_dir}"
    )
