"""The training loop: eval and checkpoints on schedule, exact resume, Ctrl-C/SIGTERM, NaN guard, logs.

`train` = `_setup` (a `Run` built from a RunConfig: model, batch sources, objective, optimizer, resumed state)
then `_loop` (step by step, top to bottom). The math of one step (AMP, gradient accumulation, clipping, LR
schedule) is in engine.train.step and re-exported here; what is optimized is the run's Objective
(engine.train.objectives): the loop never looks inside a batch. The loss and the optimizer go through
`kernels` (fused when compiled, exact PyTorch fallbacks otherwise).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

import kernels
from engine.adapters.lora import is_lora, trainable_summary
from engine.config import RunConfig, TrainConfig
from engine.files import atomic_write
from engine.train import distributed
from engine.train.checkpoint import (is_sharded, list_checkpoints, load_model_weights, load_training_state,
                                     prune_checkpoints, save_checkpoint, save_final)
from engine.train.distributed import Dist
from engine.train.run_dir import claim_out_dir
from engine.train.objectives import AMP_DTYPES, IGNORE_INDEX, TokenLoss  # noqa: F401  (re-exported)
from engine.train.run_factory import (RunData, build_batch_sources, build_model, build_objective, build_tokenizer,
                                      check_run_config, resolve_device)
from engine.train.step import evaluate, lr_at, make_optimizer, param_groups, train_step  # noqa: F401
from engine.train.run_state import CollectiveTimeout, NonFiniteLoss, RunState, finite_or_none

logger = logging.getLogger("engine.train.loop")


@dataclass
class RunResult:
    out_dir: Path
    step: int
    tokens_seen: int
    losses: list = field(default_factory=list)  # (step, train loss) for every step run in this process
    val_loss: Optional[float] = None
    interrupted: bool = False
    final_dir: Optional[Path] = None


def total_steps(cfg: TrainConfig, tokens_per_step: int) -> int:
    by_tokens = math.ceil(cfg.max_tokens / tokens_per_step) if cfg.max_tokens else None
    return min(s for s in (cfg.max_steps, by_tokens) if s is not None)


@dataclass
class Run:
    """What `_setup` builds from a RunConfig; only `state` changes while the loop runs."""

    cfg: RunConfig
    group: Dist
    device: torch.device
    tokenizer: object
    model: nn.Module
    data: RunData  # the train and val batch sources
    objective: nn.Module  # the Objective, wrapped by DDP/FSDP under torchrun
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    tokens_per_step: int
    steps: int  # the step the run ends at (train.max_steps / max_tokens)
    state: RunState
    resume_from: Optional[Path] = None
    task_eval: Optional[object] = None  # train.eval_tasks (engine.train.eval_tasks.TaskEval), or None

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)


def train(cfg: RunConfig, *, progress: bool = True, on_step: Optional[Callable[[dict], None]] = None) -> RunResult:
    """Run (or resume) the training described by `cfg`; return where it ended and the per-step losses.

    Under torchrun (WORLD_SIZE > 1) every rank runs this; rank 0 prepares the data and tokenizer first,
    and alone logs, shows progress and writes metrics (see engine.train.distributed).
    """
    check_run_config(cfg)
    group, device = distributed.init_distributed(cfg, resolve_device(cfg.train.device))
    try:
        task_eval = _task_eval(cfg, group)  # bad task names fail before anything is written
        run = _setup(cfg, group, device, progress and group.is_main)
        run.task_eval = task_eval
        return _loop(run, progress and group.is_main, on_step)
    except RuntimeError as exc:
        if group.enabled and distributed.is_timeout(exc):
            raise CollectiveTimeout(
                f"distributed: rank {group.rank} waited more than distributed.timeout_s={cfg.distributed.timeout_s:g} s "
                f"for another rank in a collective (a rank is stuck or died); raise distributed.timeout_s if a "
                f"step or save legitimately takes longer ({str(exc).splitlines()[0][-160:]})") from None
        raise
    finally:
        kernels.release_workspace()  # the loss's reusable logits buffer: not needed after training
        distributed.shutdown(group)


def _setup(cfg: RunConfig, group: Dist, device: torch.device, progress: bool) -> Run:
    """Tokenizer, model, data, objective, optimizer, and the state of the checkpoint being resumed (if any)."""
    t = cfg.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank

    def prepare():
        resume_from = claim_out_dir(cfg) if group.is_main else None  # first: it may refuse the out_dir
        tokenizer, tokenizer_dir = build_tokenizer(cfg, progress)
        model = build_model(cfg, tokenizer).to(device)
        return resume_from, tokenizer, model, build_batch_sources(cfg, tokenizer, tokenizer_dir, progress)

    # rank 0 trains the tokenizer and tokenizes the corpus once; the others reuse its cache
    resume_from, tokenizer, model, data = group.main_first(prepare)
    resume_from = group.broadcast(resume_from)
    if resume_from is not None and not is_sharded(resume_from):
        load_model_weights(resume_from, model)  # before DDP/FSDP take the weights over
    hidden_fn = torch.compile(model.hidden_states) if t.compile else None
    objective = distributed.wrap(build_objective(cfg, model, hidden_fn, tokenizer), model.layers, group, device,
                                 AMP_DTYPES.get(t.precision))
    optimizer = make_optimizer(model, t)  # after wrap: FSDP replaced the parameters by their shards
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    if group.is_main:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(cfg.out_dir) / "run_config.json", json.dumps(cfg.to_dict(), indent=2))
    tokens_per_step = t.batch_size * t.grad_accum * group.world_size * cfg.data.seq_len
    run = Run(cfg, group, device, tokenizer, model, data, objective, optimizer, scaler, tokens_per_step,
              total_steps(t, tokens_per_step), RunState(), resume_from)
    if resume_from is not None:
        _resume(run)
    if group.is_main:
        _log_start(run)
    return run


def _resume(run: Run) -> None:
    """Load the optimizer, scaler, RNG and counters of `run.resume_from` (its weights are loaded already)."""
    saved = load_training_state(run.resume_from, run.model, run.optimizer, run.scaler, run.group, run.objective)
    run.state = RunState.from_trainer_state(saved)
    logger.info("resumed from %s at step %d", run.resume_from, run.state.step)
    if saved.get("tokens_per_step", run.tokens_per_step) != run.tokens_per_step:
        logger.warning("resume: this run takes %d tokens per step, the checkpoint's took %d; the data order "
                       "continues exactly only when batch_size x grad_accum x ranks stays the same",
                       run.tokens_per_step, saved["tokens_per_step"])


def _log_start(run: Run) -> None:
    cfg, group, model = run.cfg, run.group, run.model
    logger.info("model: %.2fM params on %s, %s, %d tokens per step%s", model.config.num_params / 1e6, run.device,
                cfg.train.precision, run.tokens_per_step,
                f" ({group.world_size} ranks, {group.strategy})" if group.enabled else "")
    if cfg.train.precision == "fp16" and run.device.type == "cpu":
        logger.warning("train.precision: fp16 on CPU runs slower than fp32 and needs loss scaling; bf16 is the "
                       "mixed precision for CPUs")
    if is_lora(model):
        lora = cfg.lora
        logger.info("lora: r=%d alpha=%g on %s, base %s: %s", lora.rank, lora.alpha, ",".join(lora.targets),
                    lora.base_dtype, trainable_summary(model))


def _loop(run: Run, progress: bool, on_step) -> RunResult:
    """Step until run.steps (or Ctrl-C / SIGTERM), evaluating and checkpointing on schedule; then the
    last checkpoint and, when the run completed, final/."""
    from engine.train.metrics import ProgressBar

    state, t = run.state, run.cfg.train
    result = RunResult(run.out_dir, state.step, state.tokens_seen)
    if state.step >= run.steps:
        return _nothing_to_train(run, result)
    report = _Reporter(run, progress) if run.group.is_main else None
    bar = ProgressBar(run.steps, state.step, enabled=progress)
    stop = distributed.StopRequest(run.group)
    run.model.train()
    try:
        with _console(progress):  # log lines above the bar, not through it
            while state.step < run.steps:
                row = _train_one_step(run)
                result.losses.append((state.step, row["loss"]))
                if run.data.val is not None and t.eval_every and (state.step % t.eval_every == 0
                                                                  or state.step == run.steps):
                    row.update(_eval_row(run))
                if run.task_eval is not None and (state.step % t.eval_every == 0 or state.step == run.steps):
                    row.update(_eval_tasks_row(run))
                if report is not None:
                    report.step(row)
                _check_finite(run, row)
                bar.update(row)
                if on_step is not None:
                    on_step(row)
                if t.save_every and state.step % t.save_every == 0 and state.step < run.steps:
                    _checkpoint(run, report)
                if stop.requested():
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        result.interrupted = True
        if run.group.is_main:
            bar.write(f"interrupted at step {state.step}: saving a checkpoint")
    finally:
        stop.close()
        bar.close()
        if report is not None:
            report.close()
    last = _checkpoint(run)
    result.step, result.tokens_seen, result.val_loss = state.step, state.tokens_seen, state.val_loss
    if not result.interrupted:
        result.final_dir = run.out_dir / "final"
        _save_final(result.final_dir, run.model, run.tokenizer, run.group)
    if run.group.is_main:
        logger.info("checkpoint: %s", last)
    return result


def _console(progress: bool):
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm() if progress else contextlib.nullcontext()


def _nothing_to_train(run: Run, result: RunResult) -> RunResult:
    """A resumed checkpoint already at (or past) the run's last step: say so, write nothing but a missing final/."""
    state = run.state
    if run.group.is_main:
        logger.warning("resume: %s is at step %d, %s the run's %d steps (train.max_steps / train.max_tokens): "
                       "nothing to train; raise train.max_steps to train further", run.resume_from, state.step,
                       "already at" if state.step == run.steps else "past", run.steps)
    result.val_loss, result.final_dir = state.val_loss, run.out_dir / "final"
    if not result.final_dir.is_dir():  # e.g. interrupted right after the last step
        _save_final(result.final_dir, run.model, run.tokenizer, run.group)
    return result


def _check_finite(run: Run, row: dict) -> None:
    """Count a step whose update was skipped for a NaN/inf loss or grad norm; NonFiniteLoss once more than
    train.max_nonfinite_steps came in a row (nothing more is saved: the checkpoints hold finite weights)."""
    state, limit = run.state, run.cfg.train.max_nonfinite_steps
    if not row.get("skipped"):
        state.nonfinite_streak = 0
        return
    state.nonfinite_streak += 1
    what = "loss" if not math.isfinite(row["loss"]) else "gradient norm"
    if state.nonfinite_streak > limit:
        saved = list_checkpoints(run.out_dir)
        error = NonFiniteLoss(f"non-finite {what} at step {row['step']} ({state.nonfinite_streak} in a row, more "
                              f"than train.max_nonfinite_steps={limit}); stopped without saving. Latest checkpoint: "
                              f"{saved[-1] if saved else 'none'} (finite weights); lower train.lr or raise "
                              f"train.max_nonfinite_steps, then resume")
        # every rank stops at this step (the loss is global); rank 0 alone reports it, like its other errors
        raise error if run.group.is_main else distributed.RankZeroFailed(error)
    if run.group.is_main:
        logger.warning("step %d: non-finite %s, update skipped (%d in a row, train.max_nonfinite_steps=%d)",
                       row["step"], what, state.nonfinite_streak, limit)


def _train_one_step(run: Run) -> dict:
    """One optimizer step at run.state.step: set the lr, read the step's micro-batches, step; its metrics row."""
    state, t, group = run.state, run.cfg.train, run.group
    lr = lr_at(state.step, t, run.steps)
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = lr
    batches = [run.data.train.batch(state.step, m, batch_size=t.batch_size, accum=t.grad_accum, rank=group.rank,
                                    world_size=group.world_size) for m in range(t.grad_accum)]
    batches, prepared = distributed.unwrap(run.objective).prepare(batches, state.step)  # GRPO: sampling
    started = time.perf_counter()
    out = train_step(run.model, run.optimizer, batches, device=run.device, precision=t.precision,
                     scaler=run.scaler, loss_module=run.objective, group=group)
    state.step += 1
    state.tokens_seen += run.tokens_per_step
    extra = {k: v for k, v in out.items() if k not in ("loss", "tokens", "grad_norm", "skipped")}
    row = {"step": state.step, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
           "tokens_per_s": run.tokens_per_step / (time.perf_counter() - started), "tokens_seen": state.tokens_seen,
           "time": round(time.time(), 3), **extra, **prepared}  # time: unix s, to line runs up with other logs
    if prepared:  # the objective did work before the step (GRPO's generation): time the step's own part too
        row["train_time_s"] = time.perf_counter() - started
    if out["skipped"]:
        row["skipped"] = True
    return row


def _eval_row(run: Run) -> dict:
    t = run.cfg.train
    val_loss = evaluate(run.model, run.data.val, batch_size=t.batch_size, max_batches=t.eval_batches,
                        device=run.device, precision=t.precision, loss_module=run.objective, group=run.group)
    run.state.record_eval(val_loss)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def _task_eval(cfg: RunConfig, group: Dist):
    if not cfg.train.eval_tasks:
        return None
    from engine.train.eval_tasks import TaskEval

    return TaskEval(cfg, group.world_size)


def _eval_tasks_row(run: Run) -> dict:
    """train.eval_tasks' metrics (rank 0 runs them; the other ranks' rows stay without them)."""
    if run.task_eval is None or not run.group.is_main:
        return {}
    return run.task_eval.row(run.model, run.tokenizer, run.device, run.cfg.train.precision)


class _Reporter:
    """Rank 0's outputs of a step: metrics.jsonl and trackers (every train.log_every steps and at evals) and,
    without the progress bar, a log line for the same rows (CI logs show the run's progress)."""

    def __init__(self, run: Run, progress: bool):
        from engine.train.metrics import MetricsLog
        from engine.train.tracking import Trackers

        self.every, self.steps, self.progress = run.cfg.train.log_every, run.steps, progress
        self.metrics = MetricsLog(run.out_dir / "metrics.jsonl", truncate_after=run.state.step)
        self.trackers = Trackers(run.cfg.logging, run.out_dir, run.cfg.to_dict())

    def step(self, row: dict) -> None:
        from engine.train.metrics import is_logged

        if not is_logged(row, self.every):
            return
        self.metrics.write({k: finite_or_none(v) for k, v in row.items()})  # JSON has no NaN: null
        self.trackers.log({k: finite_or_none(v) for k, v in row.items()})
        if not self.progress:
            logger.info(step_line(row, self.steps))
        elif "val_loss" in row:
            logger.info("step %d: val loss %.4f", row["step"], row["val_loss"])

    def close(self) -> None:
        self.metrics.close()  # fsynced before the last checkpoint is written
        self.trackers.close()


def step_line(row: dict, steps: int) -> str:
    """One log line for a metrics row: `step 8/24 | loss 4.1234 | lr 3.00e-04 | grad_norm 0.512 | 1,234 tok/s`."""
    parts = [f"step {row['step']}/{steps}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}"]
    if row.get("grad_norm") is not None:
        parts.append(f"grad_norm {row['grad_norm']:.3f}")
    parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if "val_loss" in row:
        parts.append(f"val_loss {row['val_loss']:.4f} (ppl {row['val_ppl']:.2f})")
    if row.get("skipped"):
        parts.append("update skipped (non-finite)")
    return " | ".join(parts)


def _checkpoint(run: Run, report: Optional["_Reporter"] = None) -> Path:
    """Save a checkpoint of the current step (every rank takes part) and prune old ones."""
    state, t = run.state, run.cfg.train
    if report is not None:  # a resume keeps the rows up to its checkpoint: durable before the checkpoint is
        report.metrics.sync()
    trainer_state = state.trainer_state(
        world_size=run.group.world_size, tokens_per_step=run.tokens_per_step,
        sampler={"seed": t.seed, "next_step": state.step},
        scheduler={"kind": t.schedule, "total_steps": run.steps, "next_lr": lr_at(state.step, t, run.steps)})
    path = save_checkpoint(run.out_dir, state.step, run.model, run.tokenizer, run.optimizer, run.scaler,
                           trainer_state, run.cfg.to_dict(), run.group, run.objective)
    if run.group.is_main:
        prune_checkpoints(run.out_dir, t.keep_last)
        logger.info("step %d: saved checkpoint %s", state.step, path)
    return path


def _save_final(directory: Path, model, tokenizer, group: Dist) -> None:
    """The trained model in HF layout (a LoRA run: the adapter alone, PEFT layout; cli.export merges it)."""
    params = distributed.full_params(model, group)
    if group.is_main:
        save_final(directory, model, tokenizer, params)
    group.barrier()
