"""python -m bench.bench_lm_eval [--model HF_DIR (default: the real SmolLM2-135M-Instruct, bench/smollm2.py)] [--limit 20] : the engine's lm-eval LM beside lm-eval's
own `hf` backend on the same model and tasks (examples/lm_eval_tasks plus a rolling-perplexity task written here):
wall time of each, their ratio, the largest log-likelihood difference and both metric sets. Run from the repo root
after `python examples/make_example_data.py`. Timings are noisy on a shared machine: compare the ratio."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from cli.common import load_for_inference
from engine.eval.lm_eval_model import EngineLM, metrics_of, run_tasks, task_manager


def _ppl_task(root: Path) -> Path:
    docs = [{"text": p.read_text()[:2000]} for p in sorted(Path("engine/data").glob("*.py"))[:8]]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "code_ppl.yaml").write_text(
        f"task: code_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="HF-format model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    if args.model is None:
        from bench import smollm2

        args.model = str(smollm2.hf_dir())
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = ["python_repl", "code_ppl"]
    include = ["examples/lm_eval_tasks", str(_ppl_task(Path(tempfile.mkdtemp())))]
    manager = task_manager(tasks, include)
    model, tok = load_for_inference(args.model)
    t0 = time.perf_counter()
    ours = run_tasks(EngineLM(model, tok, batch_size=args.batch_size), tasks, limit=args.limit, manager=manager,
                     bootstrap_iters=0, log_samples=True)
    t_ours = time.perf_counter() - t0
    del model
    hf = HFLM(pretrained=args.model, batch_size=args.batch_size, device="cpu", dtype="float32")
    t0 = time.perf_counter()
    theirs = simple_evaluate(model=hf, tasks=tasks, limit=args.limit, task_manager=manager, bootstrap_iters=0,
                             log_samples=True)
    t_hf = time.perf_counter() - t0
    diff, same_text = 0.0, True
    for task in tasks:
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            for x, y in zip(a["resps"], b["resps"], strict=True):
                x, y = x[0], y[0]
                if isinstance(x, str):
                    same_text &= x == y
                else:
                    x, y = (x if isinstance(x, float) else x[0]), (y if isinstance(y, float) else y[0])
                    diff = max(diff, abs(x - y))
    print(f"engine {t_ours:.1f} s, lm-eval hf {t_hf:.1f} s (ratio hf/engine {t_hf / t_ours:.2f}); "
          f"max |loglikelihood diff| {diff:.2e}; generations identical: {same_text}")
    print("engine:", json.dumps(metrics_of(ours)))
    print("hf:    ", json.dumps(metrics_of(theirs)))


if __name__ == "__main__":
    sys.exit(main())
