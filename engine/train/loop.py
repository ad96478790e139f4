"""The training loop: AMP, gradient accumulation, clipping, LR schedule, eval, checkpoints, exact resume.

Small pure helpers first (lr_at, param_groups, train_step, evaluate), then `train`: `_setup` builds a `Run`
from a RunConfig (model, batch sources, objective, optimizer, resumed state), `_loop` runs it step by step.
What is optimized is the run's Objective (engine.train.objectives): the loop never looks inside a batch.
The loss and the optimizer go through `kernels` (fused when compiled, exact PyTorch fallbacks otherwise):
the objective's `token_loss_sum` and `make_optimizer` are the only two call sites.
"""
from __future__ import annotations

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
from engine.train.checkpoint import (find_resume, is_sharded, load_model_weights, load_training_state,
                                     prune_checkpoints, save_checkpoint, save_model)
from engine.train.distributed import SINGLE, Dist
from engine.train.objectives import AMP_DTYPES, IGNORE_INDEX, TokenLoss, autocast, to_device  # noqa: F401
from engine.train.run_factory import (RunData, build_batch_sources, build_model, build_objective, build_tokenizer,
                                      check_run_config, resolve_device)
from engine.train.run_state import RunState, finite_or_none

logger = logging.getLogger("engine.train.loop")


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear/constant decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (>= 2-D: linears, embeddings) only; never on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model, cfg: TrainConfig):
    """kernels.AdamW (fused when built) with global-norm clipping folded into its step."""
    return kernels.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                         eps=cfg.eps, max_grad_norm=cfg.grad_clip or None)


def train_step(model, optimizer, micro_batches, *, device, precision="fp32", scaler=None, hidden_fn=None,
               loss_module=None, group: Dist = SINGLE) -> dict:
    """One optimizer step over `micro_batches` (batches of the objective; for TokenLoss (inputs, targets[,
    position_ids, attn_mask])), normalized by the units (target tokens) of the whole window.

    Dividing every micro-batch's summed loss by the units of the *whole* window makes k micro-batches
    of b sequences give the same gradient as one batch of k*b, even when ignore_index counts differ.
    Under torchrun the window spans all ranks (see engine.train.distributed); `loss_module` is then the
    DDP/FSDP-wrapped objective, and the returned loss is the global one. A non-finite loss or gradient
    norm is not applied (`skipped`): the weights and the optimizer state stay as they were.
    """
    objective = loss_module if loss_module is not None else TokenLoss(model, precision, hidden_fn)
    units = distributed.unwrap(objective).units
    n_units = int(group.sum(sum(units(mb) for mb in micro_batches)))
    total, sums = 0.0, {}
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, device)
        with distributed.gradient_sync(objective, group, sync=i == len(micro_batches) - 1):
            with autocast(device, precision):
                loss_sum, metrics = objective(batch)
                loss = loss_sum / max(n_units, 1)
            # DDP/FSDP average the ranks' gradients; the global loss is their sum
            (scaler.scale(loss * group.world_size) if scaler is not None else loss * group.world_size).backward()
        total += float(loss.detach())
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    total = group.sum(total)
    grad_norm, applied = _apply_update(optimizer, scaler, group, loss_finite=math.isfinite(total))
    optimizer.zero_grad(set_to_none=True)
    means = {name: group.sum(value) / max(n_units, 1) for name, value in sums.items()}
    return {"loss": total, "tokens": n_units, "grad_norm": grad_norm, "skipped": not applied, **means}


def _apply_update(optimizer, scaler, group: Dist, loss_finite: bool) -> tuple[Optional[float], bool]:
    """Step the optimizer unless the loss or the gradients are non-finite; (grad norm or None, applied).

    fp16: the GradScaler already skips steps with inf/NaN gradients (and backs its scale off); those are the
    scaler's normal work, so only a non-finite loss counts as a skipped step there.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)  # before the optimizer clips and steps
        if loss_finite:
            scaler.step(optimizer)
        scaler.update()
        applied = loss_finite
    else:
        norm = _grad_norm(optimizer, group) if loss_finite else math.nan
        applied = math.isfinite(norm)
        if not applied:
            return norm, False
        optimizer.step()
    grad_norm = getattr(optimizer, "last_grad_norm", None)
    return (None if grad_norm is None else float(grad_norm)), applied


def _grad_norm(optimizer, group: Dist) -> float:
    """Global L2 norm of the gradients, to check them before they reach the weights and AdamW's moments."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP: this rank's shards
    if not grads:
        return 0.0
    sumsq = float(torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum())
    if group.enabled and group.strategy == "fsdp":  # DDP's gradients are whole after the all-reduce
        sumsq = group.sum(sumsq)
    return math.sqrt(sumsq) if math.isfinite(sumsq) else math.nan


@torch.no_grad()
def evaluate(model, windows, *, batch_size: int, max_batches: int, device, precision="fp32", loss_module=None,
             group: Dist = SINGLE) -> float:
    """Mean per-unit validation loss over the first `max_batches` val batches (deterministic); under
    torchrun each rank takes every world_size-th batch and the sums are combined."""
    # DDP: the wrapped module alone (its forward would sync buffers, and ranks may run different batch counts).
    # FSDP: every forward all-gathers weights, a collective, so every rank runs every batch.
    objective = distributed.unwrap(loss_module) if loss_module is not None else TokenLoss(model, precision)
    split = group if group.strategy != "fsdp" else SINGLE
    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    for batch in windows.eval_batches(batch_size, max_batches, rank=split.rank, world_size=split.world_size):
        n += objective.units(batch)
        with autocast(device, precision):
            loss_sum += float(objective(to_device(batch, device))[0])
    model.train(was_training)
    return split.sum(loss_sum) / max(split.sum(n), 1)


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
        run = _setup(cfg, group, device, progress and group.is_main)
        return _loop(run, progress and group.is_main, on_step)
    finally:
        kernels.release_workspace()  # the loss's reusable logits buffer: not needed after training
        distributed.shutdown(group)


def _setup(cfg: RunConfig, group: Dist, device: torch.device, progress: bool) -> Run:
    """Tokenizer, model, data, objective, optimizer, and the state of the checkpoint being resumed (if any)."""
    t = cfg.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank

    def prepare():
        tokenizer, tokenizer_dir = build_tokenizer(cfg, progress)
        model = build_model(cfg, tokenizer).to(device)
        return tokenizer, model, build_batch_sources(cfg, tokenizer, tokenizer_dir, progress)

    # rank 0 trains the tokenizer and tokenizes the corpus once; the others reuse its cache
    tokenizer, model, data = group.main_first(prepare)
    resume_from = find_resume(Path(cfg.out_dir), cfg.resume)
    if resume_from is not None and not is_sharded(resume_from):
        load_model_weights(resume_from, model)  # before DDP/FSDP take the weights over
    hidden_fn = torch.compile(model.hidden_states) if t.compile else None
    objective = distributed.wrap(build_objective(cfg, model, hidden_fn), model.layers, group, device,
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
    report = _Reporter(run) if run.group.is_main else None
    bar = ProgressBar(run.steps, state.step, enabled=progress)
    stop = distributed.StopRequest(run.group)
    run.model.train()
    try:
        while state.step < run.steps:
            row = _train_one_step(run)
            result.losses.append((state.step, row["loss"]))
            if run.data.val is not None and t.eval_every and (state.step % t.eval_every == 0
                                                              or state.step == run.steps):
                row.update(_eval_row(run))
            if report is not None:
                report.step(row)
            bar.update(row)
            if on_step is not None:
                on_step(row)
            if t.save_every and state.step % t.save_every == 0 and state.step < run.steps:
                _checkpoint(run)
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


def _train_one_step(run: Run) -> dict:
    """One optimizer step at run.state.step: set the lr, read the step's micro-batches, step; its metrics row."""
    state, t, group = run.state, run.cfg.train, run.group
    lr = lr_at(state.step, t, run.steps)
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = lr
    batches = [run.data.train.batch(state.step, m, batch_size=t.batch_size, accum=t.grad_accum, rank=group.rank,
                                    world_size=group.world_size) for m in range(t.grad_accum)]
    started = time.perf_counter()
    out = train_step(run.model, run.optimizer, batches, device=run.device, precision=t.precision,
                     scaler=run.scaler, loss_module=run.objective, group=group)
    state.step += 1
    state.tokens_seen += run.tokens_per_step
    extra = {k: v for k, v in out.items() if k not in ("loss", "tokens", "grad_norm", "skipped")}
    return {"step": state.step, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
            "tokens_per_s": run.tokens_per_step / (time.perf_counter() - started), "tokens_seen": state.tokens_seen,
            **extra}


def _eval_row(run: Run) -> dict:
    t = run.cfg.train
    val_loss = evaluate(run.model, run.data.val, batch_size=t.batch_size, max_batches=t.eval_batches,
                        device=run.device, precision=t.precision, loss_module=run.objective, group=run.group)
    run.state.record_eval(val_loss)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


class _Reporter:
    """Rank 0's outputs of a step: metrics.jsonl (every train.log_every steps and at evals) and trackers."""

    def __init__(self, run: Run):
        from engine.train.metrics import MetricsLog
        from engine.train.tracking import Trackers

        self.every = run.cfg.train.log_every
        self.metrics = MetricsLog(run.out_dir / "metrics.jsonl", truncate_after=run.state.step)
        self.trackers = Trackers(run.cfg.logging, run.out_dir, run.cfg.to_dict())

    def step(self, row: dict) -> None:
        from engine.train.metrics import is_logged

        row = {k: finite_or_none(v) for k, v in row.items()}  # JSON has no NaN
        self.metrics.write(row, every=self.every)
        if is_logged(row, self.every):
            self.trackers.log(row)

    def close(self) -> None:
        self.trackers.close()


def _checkpoint(run: Run) -> Path:
    """Save a checkpoint of the current step (every rank takes part) and prune old ones."""
    state, t = run.state, run.cfg.train
    trainer_state = state.trainer_state(
        world_size=run.group.world_size, tokens_per_step=run.tokens_per_step,
        sampler={"seed": t.seed, "next_step": state.step},
        scheduler={"kind": t.schedule, "total_steps": run.steps, "next_lr": lr_at(state.step, t, run.steps)})
    path = save_checkpoint(run.out_dir, state.step, run.model, run.tokenizer, run.optimizer, run.scaler,
                           trainer_state, run.cfg.to_dict(), run.group, run.objective)
    if run.group.is_main:
        prune_checkpoints(run.out_dir, t.keep_last)
    return path


def _save_final(directory: Path, model, tokenizer, group: Dist) -> None:
    """The trained model in HF layout (a LoRA run: the adapter alone, PEFT layout; cli.export merges it)."""
    params = distributed.full_params(model, group)
    if group.is_main:
        save_model(directory, model, params)
        tokenizer.save_pretrained(directory)
    group.barrier()
