"""`moelab diagnose RUN_DIR`."""

from __future__ import annotations

import argparse
import json


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Explain a run's router health and guardrail events: a verdict (healthy / degraded /
    collapsed, naming the MoE layers and why), per-layer balance, entropy, router-logit and
    dead-expert figures over the end of the run, and every alert, spike and rollback with its step.
    Writes one self-contained HTML report with plots (expert-load heatmaps per layer, balance and
    entropy curves, z-loss and max logit, loss and gradient norm with spikes and rollbacks marked)
    to RUN_DIR/diagnose.html, or --out. Reads only the run directory's files, so it works on a run
    still training and on runs written by older moelab versions."""
    from moelab.analysis.diagnose import REPORT_NEEDS, diagnose, diagnose_text, render_report
    from moelab.extras import require

    if not args.no_report:
        require(REPORT_NEEDS, "report", "matplotlib")
    d = diagnose(args.run)
    if args.json:
        print(json.dumps(d.to_dict(), indent=1))
    else:
        print(diagnose_text(d))
    if not args.no_report:
        path = render_report(d, args.out)
        if not args.json:
            print(f"\nreport: {path}")
    return 0


def register(sub, command) -> None:
    """Add this subsystem's subcommands to the `moelab` parser."""
    p = command(
        sub, "diagnose", cmd_diagnose, "router health, alerts and a verdict for a run, as text and an HTML report"
    )
    p.add_argument("run", metavar="RUN_DIR", help="a run directory (what `moelab train --out` wrote)")
    p.add_argument("--out", help="the HTML report to write (default RUN_DIR/diagnose.html)")
    p.add_argument("--json", action="store_true", help="print the diagnosis as one JSON object instead of text")
    p.add_argument("--no-report", action="store_true", help="print the diagnosis only; write no HTML")
