"""python -m cli.eval --model DIR [--adapter DIR] --tasks T1,T2 [--limit N] [--num-fewshot K] [--batch-size B]
[--output results.json] : score a model on lm-evaluation-harness tasks (needs pip install -e ".[eval]").

--model is an HF model dir or hub id, a training checkpoint, or a LoRA run's final/ (its base comes with it);
--adapter applies a PEFT adapter on top. Tasks are lm-eval's own (hellaswag, arc_easy, ...; their datasets come
from the Hub) or ones defined in YAML files under --include-path (e.g. over a local jsonl: `dataset_path: json`,
`dataset_kwargs: {data_files: ...}`). Prints one line per task metric; --output writes lm-eval's results JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from cli.common import exit_on_user_error, load_for_inference
from engine.config import ConfigError
from engine.files import atomic_write


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cli.eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="HF model dir / hub id, checkpoint, or LoRA run dir")
    p.add_argument("--adapter", default=None, help="PEFT adapter dir applied on top of --model (default: none)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (globs allowed)")
    p.add_argument("--include-path", default=None, help="dir of extra lm-eval task YAML files (default: none)")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task: an integer count, or a fraction below 1 (default: all)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--max-length", type=int, default=None,
                   help="context length (default: the model's max_position_embeddings)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype (default: fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="bootstrap resamples for stderr; 0 skips stderr (default: 100000, as lm-eval)")
    p.add_argument("--output", default=None, help="write lm-eval's results as JSON here (default: print only)")
    return p.parse_args(argv)


def check_args(args) -> list[str]:
    """The task names; bad numbers are ConfigErrors (nothing loaded yet)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: expected one or more comma-separated lm-eval task names")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.limit is not None and (args.limit <= 0 or (args.limit >= 1 and args.limit != int(args.limit))):
        raise ConfigError(f"--limit: expected a positive integer or a fraction in (0, 1), got {args.limit:g}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot: expected an integer >= 0, got {args.num_fewshot}")
    return tasks


def _lm_eval_module():
    try:
        from engine.eval import lm_eval_model
    except ImportError as e:
        raise ConfigError(str(e)) from None
    return lm_eval_model


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with exit_on_user_error("cli.eval"):
        tasks = check_args(args)
        harness = _lm_eval_module()
        manager = harness.task_manager(tasks, args.include_path)  # an unknown task fails before the model loads
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_for_inference(args.model, args.adapter, dtype=args.dtype, device=device,
                                              merge=args.adapter is not None)
        lm = harness.EngineLM(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results = harness.run_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=limit, manager=manager,
                                    bootstrap_iters=args.bootstrap_iters)
        for name, value in harness.metrics_of(results).items():
            print(f"{name} {value:.4f}")
        if args.output:
            atomic_write(args.output, json.dumps(results, indent=2, default=str) + "\n")
            print(f"results: {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
