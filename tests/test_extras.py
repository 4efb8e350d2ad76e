"""Optional packages: a command that needs one that is missing says which, and which extra installs
it, in one line with exit code 2, before any work (no run or output directory is created)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.errors import MoelabError
from moelab.extras import EXTRAS, PACKAGE_NAMES, installed, require

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TINY = ["--preset", "tiny", "--quiet"]


def hide(monkeypatch, *modules: str) -> None:
    """Make the modules look uninstalled (importing them raises ImportError, find_spec says None)."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def refused(capsys, argv: list[str], message: str) -> None:
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines == [f"moelab: error: {message}"]


def test_extras_match_pyproject() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) == set(declared) - {"test"}
    for extra, modules in EXTRAS.items():
        packages = {re.split(r"[<>=\[ ;]", p)[0].lower().replace("_", "-") for p in declared[extra]}
        for module in modules:
            if module == "PIL":  # pillow comes with tensorboard (and matplotlib)
                continue
            assert PACKAGE_NAMES.get(module, module).lower().replace("_", "-") in packages, (extra, module)


def test_require_names_the_package_and_the_extra(monkeypatch) -> None:
    require("anything", "report")  # installed here
    hide(monkeypatch, "scipy")
    assert not installed("scipy") and installed("matplotlib")
    require("plots", "report", "matplotlib")
    with pytest.raises(MoelabError) as err:
        require("moelab forecast", "report")
    assert str(err.value) == "moelab forecast needs the scipy package: pip install 'moelab[report]'"
    hide(monkeypatch, "prometheus_client")
    with pytest.raises(MoelabError, match=r"needs the prometheus-client package: pip install 'moelab\[serve\]'"):
        require("moelab serve", "serve")
    assert not installed("no_such_module_anywhere")


@pytest.mark.parametrize(
    "command,hidden,message",
    [
        (["compare"], "matplotlib", "moelab compare needs the matplotlib package"),
        (["compare", "--seeds", "2"], "scipy", "moelab compare needs the scipy package"),
        (["sweep", "--experts", "4", "--granularity", "1"], "matplotlib", "moelab sweep needs the matplotlib package"),
        (["forecast"], "scipy", "moelab forecast needs the scipy package"),
    ],
)
def test_studies_refuse_a_missing_report_package_before_training(
    capsys, tmp_path, monkeypatch, command, hidden, message
) -> None:
    hide(monkeypatch, hidden)
    out = tmp_path / "study"
    refused(capsys, [*command, *TINY, "--out", str(out)], f"{message}: pip install 'moelab[report]'")
    assert not out.exists()


def test_a_study_refuses_a_missing_tracker_before_training(capsys, tmp_path, monkeypatch) -> None:
    hide(monkeypatch, "wandb")
    out = tmp_path / "study"
    argv = ["compare", *TINY, "--set", 'train.report_to=["wandb"]', "--out", str(out)]
    refused(capsys, argv, "train.report_to 'wandb' needs the wandb package: pip install 'moelab[track]'")
    assert not out.exists()


def test_compare_with_one_seed_needs_no_scipy(monkeypatch) -> None:
    from moelab.analysis.runs import require_study_packages
    from moelab.config import load_config

    hide(monkeypatch, "scipy")
    require_study_packages("moelab compare", [load_config(preset="tiny")], "matplotlib")


def test_diagnose_refuses_a_missing_matplotlib_before_writing(capsys, tmp_path, monkeypatch, tiny_run) -> None:
    hide(monkeypatch, "matplotlib")
    report = tmp_path / "d.html"
    refused(
        capsys,
        ["diagnose", str(tiny_run), "--out", str(report)],
        "the diagnose report (--no-report skips it) needs the matplotlib package: pip install 'moelab[report]'",
    )
    assert not report.exists()
    assert main(["diagnose", str(tiny_run), "--no-report"]) == 0  # the text needs no plots


@pytest.mark.parametrize("hidden,package", [("fastapi", "fastapi"), ("jinja2", "jinja2"), ("uvicorn", "uvicorn")])
def test_serve_refuses_a_missing_package_before_loading(capsys, monkeypatch, tiny_run, hidden, package) -> None:
    hide(monkeypatch, hidden)
    refused(
        capsys,
        ["serve", str(tiny_run), "--port", "0"],
        f"moelab serve needs the {package} package: pip install 'moelab[serve]'",
    )
