"""python -m cli.train config.json [--set train.lr=1e-4 ...] : train (or resume) a model from a run config.

On several processes: torchrun --nproc_per_node=N -m cli.train config.json (see README, "Scaling out").
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import torch

from cli import showcase
from cli.common import USER_ERRORS, add_set_argument, exit_on_user_error, load_for_inference
from engine.train.run_factory import check_run_config
from engine.config import load_run_config
from engine.train.distributed import world_from_env
from engine.infer.generate import generate
from engine.train.metrics import plot_losses
from engine.train.loop import train
from engine.quant import KINDS as QUANT_KINDS
from engine.quant.heap import huge_pages_env


# How long a rank > 0 that found a config error waits for torchrun to stop it, once rank 0 has printed the same
# error and exited; past this (rank 0 did not fail: it sees other files) the rank reports the error itself.
RANK_ZERO_GRACE_S = 60.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cli.train", description=__doc__)
    p.add_argument("config", help="run config, .json or .yaml (see configs/quickstart.json)")
    add_set_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in CI logs)")
    return p.parse_args(argv)


def print_sample(model_dir, prompt: str, max_new_tokens: int) -> None:
    model, tokenizer = load_for_inference(model_dir)  # a LoRA run's final/ is an adapter: its base comes with it
    ids = tokenizer.encode(prompt) or [tokenizer.eos_token_id]
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature=0.8, top_k=50, seed=0,
                   eos_token_id=tokenizer.eos_token_id)
    print(f"\n--- sample (temperature 0.8) ---\n{tokenizer.decode(out[0].tolist(), skip_special_tokens=True)}\n---")


def grpo_heldout(cfg, model_dir):
    """Greedy mean reward of the model (or adapter) in `model_dir` on the first grpo.eval_max_prompts of data.val."""
    from engine.data.prompts import read_prompts
    from engine.train.grpo_eval import heldout_reward

    model, tokenizer = load_for_inference(model_dir)
    prompts = read_prompts(cfg.data.val, tokenizer, cfg.data.seq_len, where="data.val")[:cfg.grpo.eval_max_prompts]
    return heldout_reward(model, tokenizer, prompts, cfg.grpo)


def dpo_heldout(cfg, final_dir) -> str:
    """The held-out (data.val) preference accuracy line: reference (the base) -> policy (the trained model)."""
    from cli.eval_dpo import preference_accuracies

    with torch.no_grad():
        if cfg.lora is not None:  # the base is the policy with its adapters disabled: one model in memory
            model, tokenizer = load_for_inference(cfg.model.from_pretrained, final_dir)
            n, ref, pol = preference_accuracies(model, tokenizer, cfg.data.val)
        else:
            model, tokenizer = load_for_inference(final_dir)
            base = load_for_inference(cfg.model.from_pretrained, require_tokenizer=False)[0]
            n, ref, pol = preference_accuracies(model, tokenizer, cfg.data.val, reference_model=base)
    return (f"held-out preference accuracy ({n} pairs of data.val, chosen logp > rejected logp): "
            f"{ref:.1%} (reference) -> {pol:.1%} (policy)")


def load_checked_config(args):
    """The run config, checked before any rank does work (every config error surfaces before any write).

    Under torchrun every rank reads the same file and finds the same error. Only rank 0 reports it: the others
    wait, silent, for torchrun to stop them once rank 0 has exited 2, and then exit 2 as well. (Leaving at once
    would race rank 0: torchrun SIGTERMs the other ranks as soon as one fails, often before rank 0 has printed.)
    """
    try:
        cfg = load_run_config(args.config, args.overrides)
        check_run_config(cfg)
        return cfg
    except USER_ERRORS:
        rank, world, _ = world_from_env()
        if world > 1 and rank != 0:
            signal.signal(signal.SIGTERM, lambda *_: os._exit(2))  # torchrun's stop: leave with rank 0's code
            time.sleep(RANK_ZERO_GRACE_S)
        raise


def restart_with_huge_pages(cfg) -> None:
    """On a quantized base, run this same command again (exec: same PID, so torchrun still tracks it) in a
    process whose torch tensors sit on huge pages (engine.quant.heap.huge_pages_env says why and when not);
    returns when no restart is needed. The config was checked first, so a bad one fails before, not twice."""
    if cfg.lora is None or cfg.lora.base_dtype not in QUANT_KINDS:
        return
    env = huge_pages_env()
    if env is None:
        return
    logging.getLogger("cli.train").info("quantized base: restarting with THP_MEM_ALLOC_ENABLE=1 (huge pages for "
                                        "large tensors; ENGINE_THP=0 to skip)")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as e:  # the interpreter could not be re-run: train here, without huge pages
        logging.getLogger("cli.train").warning("could not restart with huge pages (%s); continuing without", e)


def main(argv=None, restart: bool = False) -> None:
    """restart: allowed to re-execute the process (run as `python -m cli.train`, not called in-process)."""
    args = parse_args(argv)
    rank = world_from_env()[0]  # under torchrun, rank 0 logs and reports; the others only warn
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    with exit_on_user_error("cli.train"):
        cfg = load_checked_config(args)
        if restart:
            restart_with_huge_pages(cfg)
        scored = cfg.grpo is not None and bool(cfg.data.val) and rank == 0
        before = grpo_heldout(cfg, cfg.model.from_pretrained) if scored else None
        base_report = showcase.before(cfg, progress=not args.no_progress) if cfg.showcase and rank == 0 else None
        result = train(cfg, progress=not args.no_progress)
        if rank != 0:
            return
        if scored and not result.interrupted:
            after = grpo_heldout(cfg, result.final_dir)
            print(f"held-out reward ({after['prompts']} prompts, greedy): {before['reward']:.3f} -> "
                  f"{after['reward']:.3f}")
        if cfg.train.objective == "dpo" and cfg.data.val and not result.interrupted:
            print(dpo_heldout(cfg, result.final_dir))
        first, last = result.losses[:1], result.losses[-1:]
        if first and last:
            print(f"train loss {first[0][1]:.3f} (step {first[0][0]}) -> {last[0][1]:.3f} (step {last[0][0]})")
        if result.val_loss is not None:
            print(f"val loss {result.val_loss:.3f}")
        png = plot_losses([result.out_dir], result.out_dir / "loss.png")
        if png is not None:
            print(f"loss curve: {png}")
        if result.interrupted:
            print(f"interrupted: checkpoint saved in {result.out_dir / 'checkpoints'}; resume with "
                  f"--set resume=auto", file=sys.stderr)
            sys.exit(130)
        if cfg.lora is not None:
            print(f"adapter: {result.final_dir}  (PEFT layout; merge into a standalone model with python -m "
                  f"cli.export --checkpoint {result.final_dir} --out DIR)")
        else:
            print(f"model: {result.final_dir}  (python -m cli.generate --model {result.final_dir} --prompt ...)")
        if cfg.train.sample_prompt:
            print_sample(result.final_dir, cfg.train.sample_prompt, cfg.train.sample_tokens)
        if base_report is not None:
            showcase.after(cfg, result.final_dir, base_report, progress=not args.no_progress)


def exit_without_teardown(argv=None, restart: bool = False) -> None:
    """main(), then os._exit with its exit code: how a torchrun worker ends.

    Once DDP or FSDP has used the gloo process group, torch 2.13 keeps it alive after
    destroy_process_group (the DDP Reducer / FSDP state hold it from C++), so its socket threads still run
    while a normal exit tears down the C++ runtime. Rarely the worker then dies with SIGABRT ("terminate
    called without an active exception"; seen once in ~50 finished 2-rank test runs, on rank 1 as it left),
    which turns a completed run into a failed job. Everything is written and closed by then (checkpoints,
    metrics, trackers), so skipping the teardown loses nothing; output streams are flushed first.
    """
    code = 0
    try:
        main(argv, restart)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if world_from_env()[1] > 1:
        exit_without_teardown(restart=True)
    main(restart=True)
