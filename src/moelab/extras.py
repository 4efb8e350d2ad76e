"""Optional dependencies: which extra of `pip install 'moelab[...]'` provides each package, and one
check that a command makes before it starts any work.

The packages are imported where they are used (inside functions), so importing moelab never needs
them; `require` makes a missing one a one-line error at the start of a command instead of an
ImportError after training. It looks the modules up with `importlib.util.find_spec`, which reads
no module: checking is cheap.
"""

from __future__ import annotations

import importlib.util

from moelab.errors import MoelabError

# extra -> the top-level modules it provides (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "report": ("matplotlib", "scipy"),
    "serve": ("fastapi", "uvicorn", "prometheus_client", "jinja2"),
    "track": ("tensorboard", "wandb", "PIL"),
    "eval": ("lm_eval",),
    "data": ("datasets", "pyarrow"),
    "hf": ("transformers",),
}
# module -> the package pip installs it from, where the two names differ
PACKAGE_NAMES = {"PIL": "pillow", "lm_eval": "lm-eval", "prometheus_client": "prometheus-client"}


def installed(module: str) -> bool:
    """Whether a top-level module can be imported (False also where sys.modules holds None for it,
    which is how tests hide a package)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a __spec__
        return False


def require(what: str, extra: str, *modules: str) -> None:
    """Raise a MoelabError naming the first missing module of `modules` (default: all of the
    extra's): "<what> needs the <package> package: pip install 'moelab[<extra>]'"."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; one of {sorted(EXTRAS)}")
    for module in modules or EXTRAS[extra]:
        if not installed(module):
            package = PACKAGE_NAMES.get(module, module)
            raise MoelabError(f"{what} needs the {package} package: pip install 'moelab[{extra}]'")
