"""The training loop: AMP, gradient accumulation, clipping, LR schedule, eval, checkpoints, exact resume.

Small pure helpers first (lr_at, param_groups, token_loss_sum, train_step, evaluate), then `train`, which
wires them to a RunConfig. The loss and the optimizer go through `kernels` (fused when compiled,
exact PyTorch fallbacks otherwise): `token_loss_sum` and `make_optimizer` are the only two call sites.
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
from engine.train import distributed
from engine.train.run_factory import build_data, build_model, build_tokenizer, check_run_config, resolve_device
from engine.train.checkpoint import (find_resume, is_sharded, load_model_weights, load_training_state, prune_checkpoints,
                               save_checkpoint, save_final)
from engine.config import RunConfig, TrainConfig
from engine.dtypes import DTYPES
from engine.train.distributed import SINGLE, Dist
from engine.adapters.lora import is_lora, trainable_summary
from engine.data.sampler import IGNORE_INDEX

logger = logging.getLogger("engine.train.loop")
AMP_DTYPES = {name: DTYPES[name] for name in ("bf16", "fp16")}  # train.precision -> autocast dtype


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


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[precision])


def token_loss_sum(model, inputs, targets, precision: str = "fp32", hidden_fn=None, position_ids=None,
                   attn_mask=None) -> torch.Tensor:
    """Summed cross-entropy over the non-ignored targets [B, T]; the LM head is fused into the loss.

    position_ids [B, T] and attn_mask [B, 1, T, T] (bool) come with packed SFT rows (engine.data.sft).
    """
    h = (hidden_fn or model.hidden_states)(inputs, position_ids=position_ids, attn_mask=attn_mask)  # (B, T, C)
    w = model.output_weight
    if precision != "fp32":  # what autocast would do to the head matmul, done explicitly for the fused op
        h, w = h.to(AMP_DTYPES[precision]), w.to(AMP_DTYPES[precision])
    return kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum", out_dtype=torch.float32)


class TokenLoss(nn.Module):
    """token_loss_sum as a module's forward. This is the module DDP and FSDP wrap: they hook forward(),
    and the loss (with its fused LM head) must run inside it."""

    def __init__(self, model, precision: str = "fp32", hidden_fn=None):
        super().__init__()
        self.model, self.precision, self.hidden_fn = model, precision, hidden_fn

    def forward(self, inputs, targets, position_ids=None, attn_mask=None):
        return token_loss_sum(self.model, inputs, targets, self.precision, self.hidden_fn, position_ids, attn_mask)


def train_step(model, optimizer, micro_batches, *, device, precision="fp32", scaler=None, hidden_fn=None,
               loss_module=None, group: Dist = SINGLE) -> dict:
    """One optimizer step over `micro_batches` [(inputs, targets[, position_ids, attn_mask])], normalized by the
    window's target tokens.

    Dividing every micro-batch's summed loss by the tokens of the *whole* window makes k micro-batches
    of b sequences give the same gradient as one batch of k*b, even when ignore_index counts differ.
    Under torchrun the window spans all ranks (see engine.train.distributed); `loss_module` is then the
    DDP/FSDP-wrapped TokenLoss, and the returned loss is the global one.
    """
    loss_module = loss_module if loss_module is not None else TokenLoss(model, precision, hidden_fn)
    n_tokens = int(group.sum(sum(int((mb[1] != IGNORE_INDEX).sum()) for mb in micro_batches)))
    total = 0.0
    for i, (x, y, *packed) in enumerate(micro_batches):
        x, y, packed = x.to(device, non_blocking=True), y.to(device, non_blocking=True), _packing(packed, device)
        with distributed.gradient_sync(loss_module, group, sync=i == len(micro_batches) - 1):
            with autocast(device, precision):
                loss = loss_module(x, y, **packed) / max(n_tokens, 1)
            # DDP/FSDP average the ranks' gradients; the global loss is their sum
            (scaler.scale(loss * group.world_size) if scaler is not None else loss * group.world_size).backward()
        total += float(loss.detach())
    if scaler is not None:  # fp16: unscale before the optimizer clips and steps; skip steps with inf/NaN
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    grad_norm = getattr(optimizer, "last_grad_norm", None)
    optimizer.zero_grad(set_to_none=True)
    return {"loss": group.sum(total), "tokens": n_tokens, "grad_norm": None if grad_norm is None else float(grad_norm)}


def _packing(extra, device) -> dict:
    """(position_ids, attn_mask) of a packed batch as token_loss_sum kwargs; {} for plain windows."""
    return dict(zip(("position_ids", "attn_mask"), (t.to(device, non_blocking=True) for t in extra)))


@torch.no_grad()
def evaluate(model, windows, *, batch_size: int, max_batches: int, device, precision="fp32", loss_module=None,
             group: Dist = SINGLE) -> float:
    """Mean per-token validation loss over the first `max_batches` val batches (deterministic); under
    torchrun each rank takes every world_size-th batch and the sums are combined."""
    # DDP: the wrapped module alone (its forward would sync buffers, and ranks may run different batch counts).
    # FSDP: every forward all-gathers weights, a collective, so every rank runs every batch.
    loss_module = distributed.unwrap(loss_module) if loss_module is not None else TokenLoss(model, precision)
    split = group if group.strategy != "fsdp" else SINGLE
    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    for x, y, *packed in windows.eval_batches(batch_size, max_batches, rank=split.rank, world_size=split.world_size):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            loss_sum += float(loss_module(x, y, **_packing(packed, device)))
        n += int((y != IGNORE_INDEX).sum())
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


def train(cfg: RunConfig, *, progress: bool = True, on_step: Optional[Callable[[dict], None]] = None) -> RunResult:
    """Run (or resume) the training described by `cfg`; return where it ended and the per-step losses.

    Under torchrun (WORLD_SIZE > 1) every rank runs this; rank 0 prepares the data and tokenizer first,
    and alone logs, shows progress and writes metrics (see engine.train.distributed).
    """
    t = cfg.train
    check_run_config(cfg)
    group, device = distributed.init_distributed(cfg, resolve_device(t.device))
    try:
        return _train(cfg, group, device, progress and group.is_main, on_step)
    finally:
        kernels.release_workspace()  # the loss's reusable logits buffer: not needed after training
        distributed.shutdown(group)


def _train(cfg: RunConfig, group: Dist, device: torch.device, progress: bool, on_step) -> RunResult:
    from engine.train.metrics import MetricsLog, ProgressBar, is_logged
    from engine.train.tracking import Trackers

    t = cfg.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank

    def prepare():
        tokenizer, tokenizer_dir = build_tokenizer(cfg, progress)
        model = build_model(cfg, tokenizer).to(device)
        return tokenizer, model, build_data(cfg, tokenizer, tokenizer_dir, progress)

    # rank 0 trains the tokenizer and tokenizes the corpus once; the others reuse its cache
    tokenizer, model, data = group.main_first(prepare)
    if cfg.data.format == "sft":  # packed examples, sampled like windows
        train_windows, val_windows = data.train, data.val
    else:
        train_windows = data.windows("train", cfg.data.seq_len, seed=t.seed)
        val_windows = data.windows("val", cfg.data.seq_len) if data.meta["val_tokens"] > cfg.data.seq_len else None
    out_dir = Path(cfg.out_dir)
    resume_from = find_resume(out_dir, cfg.resume, group)
    if resume_from is not None and not is_sharded(resume_from):
        load_model_weights(resume_from, model)  # before DDP/FSDP take the weights over
    hidden_fn = torch.compile(model.hidden_states) if t.compile else None
    loss_module = distributed.wrap(TokenLoss(model, t.precision, hidden_fn), model.layers, group, device,
                                   AMP_DTYPES.get(t.precision))
    optimizer = make_optimizer(model, t)  # after wrap: FSDP replaced the parameters by their shards
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    if group.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    state = {"step": 0, "tokens_seen": 0, "val_loss": None, "best_val_loss": None}
    tokens_per_step = t.batch_size * t.grad_accum * group.world_size * cfg.data.seq_len
    if resume_from is not None:
        state.update(load_training_state(resume_from, model, optimizer, scaler, group, loss_module))
        logger.info("resumed from %s at step %d", resume_from, state["step"])
        if state.get("tokens_per_step", tokens_per_step) != tokens_per_step:
            logger.warning("resume: this run takes %d tokens per step, the checkpoint's took %d; the data order "
                           "continues exactly only when batch_size x grad_accum x ranks stays the same",
                           tokens_per_step, state["tokens_per_step"])
    steps = total_steps(t, tokens_per_step)
    result = RunResult(out_dir, state["step"], state["tokens_seen"])
    if group.is_main:
        logger.info("model: %.2fM params on %s, %s, %d tokens per step%s", model.config.num_params / 1e6, device,
                    t.precision, tokens_per_step,
                    f" ({group.world_size} ranks, {group.strategy})" if group.enabled else "")
        if is_lora(model):
            lora = cfg.lora
            logger.info("lora: r=%d alpha=%g on %s, base %s: %s", lora.rank, lora.alpha, ",".join(lora.targets),
                        lora.base_dtype, trainable_summary(model))

    def checkpoint():
        if group.is_main:
            metrics.sync()  # a resume keeps the rows up to its checkpoint: durable before the checkpoint is
        trainer_state = {**state, "world_size": group.world_size, "tokens_per_step": tokens_per_step,
                         "sampler": {"seed": t.seed, "next_step": state["step"]},
                         "scheduler": {"kind": t.schedule, "total_steps": steps, "next_lr": lr_at(state["step"], t, steps)}}
        path = save_checkpoint(out_dir, state["step"], model, tokenizer, optimizer, scaler, trainer_state,
                               cfg.to_dict(), group, loss_module)
        if group.is_main:
            prune_checkpoints(out_dir, t.keep_last)
        return path

    metrics = MetricsLog(out_dir / "metrics.jsonl", truncate_after=state["step"]) if group.is_main else None
    trackers = Trackers(cfg.logging, out_dir, cfg.to_dict()) if group.is_main else None
    bar = ProgressBar(steps, state["step"], enabled=progress)
    stop = distributed.StopRequest(group)
    model.train()
    try:
        while state["step"] < steps:
            step = state["step"]
            lr = lr_at(step, t, steps)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            batches = [train_windows.batch(step, m, batch_size=t.batch_size, accum=t.grad_accum, rank=group.rank,
                                           world_size=group.world_size) for m in range(t.grad_accum)]
            started = time.perf_counter()
            out = train_step(model, optimizer, batches, device=device, precision=t.precision, scaler=scaler,
                             loss_module=loss_module, group=group)
            state["step"] = step + 1
            state["tokens_seen"] += tokens_per_step
            row = {"step": step + 1, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
                   "tokens_per_s": tokens_per_step / (time.perf_counter() - started), "tokens_seen": state["tokens_seen"]}
            result.losses.append((step + 1, out["loss"]))
            if val_windows is not None and t.eval_every and (state["step"] % t.eval_every == 0 or state["step"] == steps):
                state["val_loss"] = evaluate(model, val_windows, batch_size=t.batch_size, max_batches=t.eval_batches,
                                             device=device, precision=t.precision, loss_module=loss_module, group=group)
                state["best_val_loss"] = min(state["val_loss"], state["best_val_loss"] or math.inf)
                row.update(val_loss=state["val_loss"], val_ppl=math.exp(min(state["val_loss"], 50.0)))
            if group.is_main:
                metrics.write(row, every=t.log_every)
                if is_logged(row, t.log_every):
                    trackers.log(row)
            bar.update(row)
            if on_step is not None:
                on_step(row)
            if t.save_every and state["step"] % t.save_every == 0 and state["step"] < steps:
                checkpoint()
            if stop.requested():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        result.interrupted = True
        if group.is_main:
            bar.write(f"interrupted at step {state['step']}: saving a checkpoint")
    finally:
        stop.close()
        bar.close()
        if trackers is not None:
            trackers.close()
    last = checkpoint()
    result.step, result.tokens_seen, result.val_loss = state["step"], state["tokens_seen"], state["val_loss"]
    if not result.interrupted:
        result.final_dir = out_dir / "final"
        _save_final(result.final_dir, model, tokenizer, group)
    if group.is_main:
        logger.info("checkpoint: %s", last)
    return result


def _save_final(directory: Path, model, tokenizer, group: Dist) -> None:
    """The trained model in HF layout (a LoRA run: the adapter alone, PEFT layout; cli.export merges it)."""
    params = distributed.full_params(model, group)
    if group.is_main:
        save_final(directory, model, tokenizer, params)
    group.barrier()
