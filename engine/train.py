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

import kernels
from engine.build import build_data, build_model, build_tokenizer, check_run_config, resolve_device
from engine.checkpoint import find_resume, load_checkpoint, prune_checkpoints, save_checkpoint
from engine.config import RunConfig, TrainConfig
from engine.lora import is_lora, save_adapter, trainable_summary

logger = logging.getLogger("engine.train")
IGNORE_INDEX = -100
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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

    position_ids [B, T] and attn_mask [B, 1, T, T] (bool) come with packed SFT rows (engine.sft).
    """
    h = (hidden_fn or model.hidden_states)(inputs, position_ids=position_ids, attn_mask=attn_mask)  # (B, T, C)
    w = model.output_weight
    if precision != "fp32":  # what autocast would do to the head matmul, done explicitly for the fused op
        h, w = h.to(AMP_DTYPES[precision]), w.to(AMP_DTYPES[precision])
    return kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum", out_dtype=torch.float32)


def train_step(model, optimizer, micro_batches, *, device, precision="fp32", scaler=None, hidden_fn=None) -> dict:
    """One optimizer step over `micro_batches` [(inputs, targets[, position_ids, attn_mask])], normalized by the
    window's target tokens.

    Dividing every micro-batch's summed loss by the tokens of the *whole* window makes k micro-batches
    of b sequences give the same gradient as one batch of k*b, even when ignore_index counts differ.
    """
    n_tokens = sum(int((mb[1] != IGNORE_INDEX).sum()) for mb in micro_batches)
    total = 0.0
    for x, y, *packed in micro_batches:
        x, y, packed = x.to(device, non_blocking=True), y.to(device, non_blocking=True), _packing(packed, device)
        with autocast(device, precision):
            loss = token_loss_sum(model, x, y, precision, hidden_fn, **packed) / max(n_tokens, 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(loss.detach())
    if scaler is not None:  # fp16: unscale before the optimizer clips and steps; skip steps with inf/NaN
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    grad_norm = getattr(optimizer, "last_grad_norm", None)
    optimizer.zero_grad(set_to_none=True)
    return {"loss": total, "tokens": n_tokens, "grad_norm": None if grad_norm is None else float(grad_norm)}


def _packing(extra, device) -> dict:
    """(position_ids, attn_mask) of a packed batch as token_loss_sum kwargs; {} for plain windows."""
    return dict(zip(("position_ids", "attn_mask"), (t.to(device, non_blocking=True) for t in extra)))


@torch.no_grad()
def evaluate(model, windows, *, batch_size: int, max_batches: int, device, precision="fp32") -> float:
    """Mean per-token validation loss over the first `max_batches` val batches (deterministic)."""
    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    for x, y, *packed in windows.eval_batches(batch_size, max_batches):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            loss_sum += float(token_loss_sum(model, x, y, precision, **_packing(packed, device)))
        n += int((y != IGNORE_INDEX).sum())
    model.train(was_training)
    return loss_sum / max(n, 1)


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
    """Run (or resume) the training described by `cfg`; return where it ended and the per-step losses."""
    from engine.report import MetricsLog, ProgressBar

    t = cfg.train
    check_run_config(cfg)
    torch.manual_seed(t.seed)
    device = resolve_device(t.device)
    tokenizer, tokenizer_dir = build_tokenizer(cfg, progress)
    model = build_model(cfg, tokenizer).to(device)
    data = build_data(cfg, tokenizer, tokenizer_dir, progress)
    if cfg.data.format == "sft":  # packed examples, sampled like windows
        train_windows, val_windows = data.train, data.val
    else:
        train_windows = data.windows("train", cfg.data.seq_len, seed=t.seed)
        val_windows = data.windows("val", cfg.data.seq_len) if data.meta["val_tokens"] > cfg.data.seq_len else None
    optimizer = make_optimizer(model, t)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    hidden_fn = torch.compile(model.hidden_states) if t.compile else None
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    state = {"step": 0, "tokens_seen": 0, "val_loss": None, "best_val_loss": None}
    resume_from = find_resume(out_dir, cfg.resume)
    if resume_from is not None:
        state.update(load_checkpoint(resume_from, model, optimizer, scaler))
        logger.info("resumed from %s at step %d", resume_from, state["step"])
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    steps = total_steps(t, tokens_per_step)
    result = RunResult(out_dir, state["step"], state["tokens_seen"])
    logger.info("model: %.2fM params on %s, %s, %d tokens per step", model.config.num_params / 1e6, device,
                t.precision, tokens_per_step)
    if is_lora(model):
        lora = cfg.lora
        logger.info("lora: r=%d alpha=%g on %s, base %s: %s", lora.rank, lora.alpha, ",".join(lora.targets),
                    lora.base_dtype, trainable_summary(model))

    def checkpoint():
        trainer_state = {**state, "sampler": {"seed": t.seed, "next_step": state["step"]},
                         "scheduler": {"kind": t.schedule, "total_steps": steps, "next_lr": lr_at(state["step"], t, steps)}}
        path = save_checkpoint(out_dir, state["step"], model, tokenizer, optimizer, scaler, trainer_state, cfg.to_dict())
        prune_checkpoints(out_dir, t.keep_last)
        return path

    metrics = MetricsLog(out_dir / "metrics.jsonl", truncate_after=state["step"])
    bar = ProgressBar(steps, state["step"], enabled=progress)
    model.train()
    try:
        while state["step"] < steps:
            step = state["step"]
            lr = lr_at(step, t, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [train_windows.batch(step, m, batch_size=t.batch_size, accum=t.grad_accum)
                       for m in range(t.grad_accum)]
            started = time.perf_counter()
            out = train_step(model, optimizer, batches, device=device, precision=t.precision, scaler=scaler,
                             hidden_fn=hidden_fn)
            state["step"] = step + 1
            state["tokens_seen"] += tokens_per_step
            row = {"step": step + 1, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
                   "tokens_per_s": tokens_per_step / (time.perf_counter() - started), "tokens_seen": state["tokens_seen"]}
            result.losses.append((step + 1, out["loss"]))
            if val_windows is not None and t.eval_every and (state["step"] % t.eval_every == 0 or state["step"] == steps):
                state["val_loss"] = evaluate(model, val_windows, batch_size=t.batch_size, max_batches=t.eval_batches,
                                             device=device, precision=t.precision)
                state["best_val_loss"] = min(state["val_loss"], state["best_val_loss"] or math.inf)
                row.update(val_loss=state["val_loss"], val_ppl=math.exp(min(state["val_loss"], 50.0)))
            metrics.write(row, every=t.log_every)
            bar.update(row)
            if on_step is not None:
                on_step(row)
            if t.save_every and state["step"] % t.save_every == 0 and state["step"] < steps:
                checkpoint()
    except KeyboardInterrupt:
        result.interrupted = True
        bar.write(f"interrupted at step {state['step']}: saving a checkpoint")
    finally:
        bar.close()
    last = checkpoint()
    result.step, result.tokens_seen, result.val_loss = state["step"], state["tokens_seen"], state["val_loss"]
    if not result.interrupted:
        result.final_dir = out_dir / "final"
        if is_lora(model):  # the adapter alone (PEFT layout); cli.export merges it into the base
            save_adapter(model, result.final_dir)
        else:
            model.save_pretrained(result.final_dir)
        tokenizer.save_pretrained(result.final_dir)
    logger.info("checkpoint: %s", last)
    return result
