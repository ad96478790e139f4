"""python -m cli.plot RUN_DIR [RUN_DIR ...] [--out PNG] : train and val loss curves of runs in one PNG, to compare them.

The PNG goes into the first run dir unless --out says otherwise: RUN_DIR/loss.png for one run (the file cli.train
draws when matplotlib is installed), FIRST_RUN_DIR/compare.png for several, so nothing lands in the working
directory (or the repo). Each run is also summarized on stdout. Needs matplotlib: pip install -e ".[plot]".
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
    p.add_argument("--out", default=None,
                   help="PNG to write (default: RUN_DIR/loss.png for one run, FIRST_RUN_DIR/compare.png for several)")
    return p.parse_args(argv)


def default_out(run_dirs) -> Path:
    """Where the PNG goes without --out: into the first run dir (loss.png for one run, compare.png for several)."""
    return Path(run_dirs[0]) / ("loss.png" if len(run_dirs) == 1 else "compare.png")


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
        out = Path(args.out) if args.out is not None else default_out(args.run_dirs)
        if not out.parent.is_dir():
            raise MetricsError(f"--out {out}: directory {out.parent} does not exist")
    for run_dir, rows in runs.items():
        print(summary(run_dir, rows))
    try:
        import matplotlib  # plot_losses draws with it; said here, by the CLI, with what to do
    except ImportError:
        matplotlib = None
    if matplotlib is None:
        print('matplotlib is not installed: no PNG written; pip install -e ".[plot]" and run this again')
        sys.exit(1)
    png = plot_losses(list(runs), out)
    print(f"loss curves: {png}")


if __name__ == "__main__":
    main()
