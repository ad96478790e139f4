"""One optimizer step and one evaluation, for any Objective: the math the loop (engine.train.loop) repeats.

lr_at (the schedule), param_groups and make_optimizer (kernels.AdamW), train_step (accumulation over
micro-batches and ranks, AMP, non-finite guard) and evaluate. The loop re-exports them.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

import kernels
from engine.config import TrainConfig
from engine.quant.heap import trim_heap
from engine.train import distributed
from engine.train.distributed import SINGLE, Dist
from engine.train.objectives import TokenLoss, autocast, to_device

_TRIM_HEAP = os.environ.get("ENGINE_TRIM_HEAP", "1") != "0"  # for A/B measurement only


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
                         eps=cfg.eps, max_grad_norm=cfg.grad_clip or None, skip_nonfinite=True)


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
    if _TRIM_HEAP:
        trim_heap()  # the freed gradients and activations back to the OS (engine/quant/heap.py)
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
    elif not loss_finite:
        return math.nan, False
    elif getattr(optimizer, "max_grad_norm", None) is not None and getattr(optimizer, "skip_nonfinite", False):
        optimizer.step()  # computes the global norm once (for the clip) and skips the step when it is inf/NaN
        if optimizer.last_step_skipped:
            return math.nan, False
        applied = True
    else:
        norm = _grad_norm(optimizer, group)
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
