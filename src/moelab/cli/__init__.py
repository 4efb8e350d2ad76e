"""`moelab <command>`: one subcommand per user task. Each command is a thin layer over functions
that tests and users can call directly; its help text is the handler's docstring. This package is
the top layer: it may import every subsystem, and no subsystem imports it.

Bad input (config, paths, data, checkpoints) ends with one line `moelab: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable

from moelab.cli import analysis, data, diagnose, interop, run, serve
from moelab.cli.common import EXIT_USAGE, log_err
from moelab.errors import MoelabError


def _command(sub, name: str, handler: Callable[[argparse.Namespace], int], summary: str) -> argparse.ArgumentParser:
    description = inspect.cleandoc(handler.__doc__ or summary)
    p = sub.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelab", description="Train, diagnose, compare and serve sparse mixture-of-experts language models."
    )
    from moelab import __version__

    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for module in (run, data, analysis, diagnose, serve, interop):
        module.register(sub, _command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.handler(args)
    except MoelabError as exc:
        # NOTE (distributed): under torchrun every rank meets the same bad input; rank 0 says it once.
        if os.environ.get("RANK", "0") == "0":
            log_err(f"moelab: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        log_err("moelab: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
