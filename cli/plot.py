"""python -m cli.plot RUN_DIR [RUN_DIR ...] [--out PNG] : train and val loss curves of runs in one PNG, to compare them.

The PNG goes to ./loss.png unless --out says otherwise: a comparison belongs to none of the runs, and
each run dir already has its own loss.png from cli.train. Each run is also summarized on stdout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import exit_on_user_error
from engine.train.metrics import MetricsError, load_run_metrics, plot_losses


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cli.plot", description=__doc__.split("\n", 1)[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's out_dir (holding metrics.jsonl)")
    p.add_argument("--out", default="loss.png", help="PNG to write (default: ./loss.png)")
    return p.parse_args(argv)


def summary(run_dir, rows: list[dict]) -> str:
    """`runs/a: 300 steps, train loss 5.01 -> 2.10, best val 2.25 (step 250)`."""
    text = f"{run_dir}: {rows[-1]['step']} steps, train loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}"
    val = [r for r in rows if r.get("val_loss") is not None]
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        text += f", best val {best['val_loss']:.3f} (step {best['step']})"
    return text


def main(argv=None) -> None:
    args = parse_args(argv)
    with exit_on_user_error("cli.plot"):
        runs = {d: load_run_metrics(d) for d in args.run_dirs}  # check every run before drawing anything
        out = Path(args.out)
        if not out.parent.is_dir():
            raise MetricsError(f"--out {out}: directory {out.parent} does not exist")
    for run_dir, rows in runs.items():
        print(summary(run_dir, rows))
    png = plot_losses(list(runs), out)
    if png is None:  # matplotlib missing: plot_losses said so
        sys.exit(1)
    print(f"loss curves: {png}")


if __name__ == "__main__":
    main()
