"""Experiment trackers (train.report_to): TensorBoard and W&B hold what metrics.jsonl holds, read
back with each library's own reader; a resumed run shows each step once; a missing package or an
unknown tracker is refused before any work."""

from __future__ import annotations

import json
import struct
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from moelab.cli import main
from moelab.config import REPORT_TO_CHOICES, load_config
from moelab.errors import ConfigError
from moelab.rundir import RunDir
from moelab.train.trackers import TRACKERS, load_heatmap, tracker_row
from moelab.train.trainer import Trainer

SETTINGS = [
    "train.max_steps=12",
    "train.log_every=2",
    "train.eval_every=4",
    "train.checkpoint_every=6",
    "train.sample_tokens=0",
]


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, silent, with its caches and settings inside the test's directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def train(out: Path, *extra: str, resume: bool = False, **kwargs):
    if resume:
        cfg = RunDir(out).load_config()
    else:
        cfg = load_config(preset="tiny", overrides=[*SETTINGS, *extra])
    return Trainer(cfg, out, resume=resume, log=lambda s: None, progress=False, **kwargs)


def expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl's rows under the trackers' names: name -> {step: value}."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for record in RunDir(run).read_metrics():
        row = tracker_row(record)
        for name, value in row.scalars.items():
            assert row.step not in series[name], f"{name} twice at step {row.step} in metrics.jsonl"
            series[name][row.step] = value
    return series


def tensorboard_events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def assert_tensorboard_matches_metrics(run: Path) -> None:
    acc = tensorboard_events(run)
    expected = expected_scalars(run)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for name, values in expected.items():
        events = acc.Scalars(name)
        steps = [e.step for e in events]
        assert steps == sorted(values), name  # each step once, in order
        # TensorBoard keeps scalars as float32
        assert [e.value for e in events] == [np.float32(values[s]) for s in steps], name


# -- W&B's offline run file: a LevelDB-style log of protobuf records (wandb's own format) ------------


def wandb_records(path: Path):
    """The records of an offline run's .wandb file, parsed with wandb's protobuf classes. The
    framing: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(run: Path) -> list[dict[int, dict]]:
    """Each offline segment's history: step -> {key: value} (wandb's own keys, `_...`, left out)."""
    segments = []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        history: dict[int, dict] = {}
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items: dict = {}
                for item in record.history.item:  # a logged object's fields come as nested keys
                    *parents, key = [item.key] if item.key else list(item.nested_key)
                    node = items
                    for parent in parents:
                        node = node.setdefault(parent, {})
                    node[key] = json.loads(item.value_json)
                history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
        segments.append(history)
    return segments


def wandb_scalars(history: dict[int, dict]) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for step, items in history.items():
        for key, value in items.items():
            if isinstance(value, (int, float)):
                series[key][step] = float(value)
    return dict(series)


# -- the mapping ----------------------------------------------------------------------------------


def test_every_tracker_name_has_a_tracker() -> None:
    assert tuple(TRACKERS) == REPORT_TO_CHOICES


def test_a_metrics_row_under_the_trackers_names() -> None:
    record = {
        "step": 10,
        "tokens": 1024,
        "loss": 2.5,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_s": 900.0,
        "router_frozen": False,
        "router.1.share": [0.5, 0.25, 0.25, 0.0],
        "router.1.imbalance": 2.0,
        "router.1.cv": 0.7,
        "router.1.maxvio": 1.0,
        "router.1.entropy": 0.9,
        "router.1.max_logit": 3.5,
        "router.1.dead": 1,
        "router.1.dead_experts": [3],
        "router.1.weight_norm": [1.0, 1.0, 1.0, 1.0],
    }
    row = tracker_row(record)
    assert row.step == 10 and row.event is None
    assert row.scalars == {
        "train/tokens": 1024.0,
        "train/loss": 2.5,
        "train/lr": 1e-3,
        "train/grad_norm": 0.5,
        "train/tokens_per_s": 900.0,
        "train/router_frozen": 0.0,
        "router/1/imbalance": 2.0,
        "router/1/cv": 0.7,
        "router/1/maxvio": 1.0,
        "router/1/entropy": 0.9,
        "router/1/max_logit": 3.5,
        "router/1/dead": 1.0,
    }
    assert row.expert_load == {1: [0.5, 0.25, 0.25, 0.0]}
    val = tracker_row({"step": 10, "tokens": 1024, "val_loss": 2.0, "val_ppl": 7.39, "train_s": 1.0})
    assert val.scalars == {"val/loss": 2.0, "val/ppl": 7.39} and not val.expert_load
    alert = tracker_row(
        {"step": 12, "event": "alert", "rule": "dead_experts", "action": "warn", "layer": 1, "message": "expert 3"}
    )
    assert alert.scalars == {} and alert.event == "step 12: alert [dead_experts -> warn] layer 1 expert 3"


def test_load_heatmap_colours_relative_load() -> None:
    image = load_heatmap({0: [0.25, 0.25, 0.25, 0.25], 1: [0.0, 0.0, 0.5, 0.5]})
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    h, w = image.shape[0] // 2, image.shape[1] // 4
    assert (image[0, 0] == 255).all()  # balanced: white
    assert image[h, 0, 2] > image[h, 0, 0]  # unused expert: blue
    assert image[h, 3 * w, 0] > image[h, 3 * w, 2]  # twice the mean: red


# -- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_tensorboard_and_wandb_hold_the_metrics_history(tmp_path) -> None:
    run = tmp_path / "run"
    train(run, 'train.report_to=["tensorboard", "wandb"]').fit()
    assert_tensorboard_matches_metrics(run)
    acc = tensorboard_events(run)
    assert "train/loss" in acc.Tags()["scalars"] and "router/0/imbalance" in acc.Tags()["scalars"]
    assert {"router/0/expert_load", "router/1/expert_load"} <= set(acc.Tags()["histograms"])
    histogram = acc.Histograms("router/0/expert_load")[0]
    shares = {r["step"]: r["router.0.share"] for r in RunDir(run).read_metrics() if "router.0.share" in r}
    assert histogram.histogram_value.bucket == pytest.approx(shares[histogram.step], rel=1e-6)
    assert acc.Tags()["images"] == ["router/expert_load"]

    (history,) = wandb_history(run)  # one offline segment
    assert wandb_scalars(history) == expected_scalars(run)  # every value exactly (JSON floats)
    assert (run / "wandb" / "run_id").is_file()
    logged = history[2]
    assert logged["router/0/expert_load"]["_type"] == "histogram"
    assert logged["router/expert_load"]["_type"] == "image-file"


@pytest.mark.slow
def test_a_resumed_run_shows_each_step_once(tmp_path) -> None:
    """Crash at step 8 (checkpoint at 6, rows logged at 8): the resumed run's TensorBoard drops
    the first attempt's step 8 and W&B continues the same run id in a second offline segment."""
    run = tmp_path / "run"

    def crash(trainer, step):
        if step == 8:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(run, 'train.report_to=["tensorboard", "wandb"]', step_hook=crash).fit()
    run_id = (run / "wandb" / "run_id").read_text()
    assert [s for s in tensorboard_events(run).Scalars("train/loss")][-1].step == 8
    train(run, resume=True).fit()
    assert_tensorboard_matches_metrics(run)  # includes: no step twice
    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per session

    first, second = wandb_history(run)
    assert max(first) == 8  # the crashed session, closed as failed
    assert min(second) == 8 and max(second) == 12  # the resumed one starts after the checkpoint
    assert (run / "wandb" / "run_id").read_text() == run_id
    # the resumed segment holds exactly what metrics.jsonl holds after step 6
    after = {name: {s: v for s, v in steps.items() if s > 6} for name, steps in expected_scalars(run).items()}
    assert wandb_scalars(second) == {name: steps for name, steps in after.items() if steps}


# -- refusals -------------------------------------------------------------------------------------


def test_unknown_tracker_is_a_config_error_naming_the_choices(capsys, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"train.report_to = \['mlflow'\].*'tensorboard', 'wandb'"):
        load_config(preset="tiny", overrides=['train.report_to=["mlflow"]'])
    out = tmp_path / "r"
    code = main(["train", "--preset", "tiny", "--quiet", "--set", 'train.report_to=["tensorbord"]', "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("moelab: error:") == 1
    assert "train.report_to = ['tensorbord']" in err and "('tensorboard', 'wandb')" in err
    assert not out.exists()


@pytest.mark.parametrize("name,package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_missing_tracker_package_is_one_line_before_the_run_directory(
    capsys, tmp_path, monkeypatch, name, package
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    out = tmp_path / "r"
    code = main(["train", "--preset", "tiny", "--quiet", "--set", f'train.report_to=["{name}"]', "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines == [
        f"moelab: error: train.report_to '{name}' needs the {package} package: pip install 'moelab[track]'"
    ]
    assert not out.exists()


def test_a_tracker_that_fails_is_dropped_with_one_line_and_the_others_go_on() -> None:
    from moelab.train.trackers import Trackers

    class Fake:
        def __init__(self, name: str, fail: bool):
            self.name, self.fail, self.rows, self.closed = name, fail, [], None

        def log(self, row) -> None:
            if self.fail:
                raise OSError("disk full")
            self.rows.append(row.step)

        def close(self, failed: bool) -> None:
            self.closed = failed

    said: list[str] = []
    bad, good = Fake("wandb", fail=True), Fake("tensorboard", fail=False)
    trackers = Trackers([bad, good], said.append)
    trackers.log({"step": 2, "loss": 1.0})
    trackers.log({"step": 4, "loss": 0.5})
    assert said == ["the wandb tracker failed (disk full); it is closed, metrics.jsonl keeps every row"]
    assert bad.closed is True and good.rows == [2, 4]
    trackers.close(failed=False)
    assert good.closed is False
