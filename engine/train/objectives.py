"""What the training loop optimizes: an `Objective`, one module with a small protocol.

The loop (engine.train.loop) knows nothing about tokens, pairs or rewards. Per micro-batch it asks the
objective two things:
  units(batch) -> int             how many normalization units the batch holds (target tokens, pairs, ...),
                                  counted from the batch alone, before any forward: the loss is divided by
                                  the units of the *whole* step (every micro-batch of every rank) before the
                                  first backward, which is what makes accumulation and ranks exact
  forward(batch) -> (loss_sum, metrics)
                                  the loss summed over the batch's units (0-dim fp32 tensor, differentiable)
                                  and sums of any extra metrics over the same units ({name: float}); the loop
                                  reports every metric as its sum over the step divided by the step's units
The objective is an nn.Module whose forward runs the model, because DDP and FSDP hook forward(): the
loss (with its fused LM head) must run inside the wrapped module. `model` is the network being trained.

A batch is whatever the run's batch source yields (engine.data: a tuple of tensors for text windows and
packed SFT rows); `to_device` moves any nesting of tuples, lists and dicts of tensors. A pairwise objective
(DPO: chosen/rejected sequences, reference log-probs computed by a frozen copy or read from the batch)
fits as is: units = pairs, forward = the summed pair loss, metrics = reward accuracy and margin sums.

TokenLoss (next-token cross-entropy over non-ignored targets) is the objective of text and SFT runs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

import kernels
from engine.data.sampler import IGNORE_INDEX
from engine.dtypes import DTYPES
from engine.model.moe import collect_router_logits, load_balancing_loss
from engine.quant import loss_chunk_rows

AMP_DTYPES = {name: DTYPES[name] for name in ("bf16", "fp16")}  # train.precision -> autocast dtype


def autocast(device: torch.device, precision: str):
    """torch.autocast for bf16/fp16 training over fp32 weights; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[precision])


def to_device(batch, device: torch.device):
    """`batch` (a tensor, or tuples/lists/dicts of them) with every tensor on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Objective(nn.Module):
    """The protocol the loop trains with (see the module docstring); subclasses set `model`."""

    model: nn.Module

    def prepare(self, batches: list, step: int) -> tuple[list, dict]:
        """The step's micro-batches as this objective trains on them, and metrics of that work (the loop calls
        it before the step is timed). Identity here; GRPO samples completions with the current model."""
        return batches, {}

    def units(self, batch) -> int:
        """Normalization units in `batch` (computed from the batch, without the model)."""
        raise NotImplementedError

    def forward(self, batch) -> tuple[torch.Tensor, dict]:
        """(loss summed over the batch's units, {metric name: sum over the same units})."""
        raise NotImplementedError


def token_loss_sum(model, inputs, targets, precision: str = "fp32", hidden_fn=None, position_ids=None,
                   attn_mask=None) -> torch.Tensor:
    """Summed cross-entropy over the non-ignored targets [B, T]; the LM head is fused into the loss.

    position_ids [B, T] and attn_mask [B, 1, T, T] (bool) come with packed SFT rows (engine.data.sft).
    """
    h = (hidden_fn or model.hidden_states)(inputs, position_ids=position_ids, attn_mask=attn_mask)  # (B, T, C)
    w = model.output_weight
    if precision != "fp32":  # what autocast would do to the head matmul, done explicitly for the fused op
        h, w = h.to(AMP_DTYPES[precision]), w.to(AMP_DTYPES[precision])
    chunk = loss_chunk_rows(model, targets.numel(), w.shape[0], h.element_size())  # smaller on a quantized base
    loss = kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum", out_dtype=torch.float32,
                                        softcap=getattr(model, "output_softcap", None),  # Gemma 2's final cap
                                        chunk_size=chunk)
    if chunk is not None:  # a quantized base: the loss's gradient is computed already, so its logits buffer
        kernels.release_workspace()  # would only sit through the backward peak (16 MiB; the next step re-takes it)
    return loss


class TokenLoss(Objective):
    """Next-token cross-entropy; a batch is (inputs, targets[, position_ids, attn_mask]), targets
    IGNORE_INDEX where nothing is learned (SFT prompts, padding). Units: the non-ignored targets."""

    def __init__(self, model, precision: str = "fp32", hidden_fn=None):
        super().__init__()
        self.model, self.precision, self.hidden_fn = model, precision, hidden_fn

    def units(self, batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def forward(self, batch) -> tuple[torch.Tensor, dict]:
        inputs, targets, *packed = batch
        packing = dict(zip(("position_ids", "attn_mask"), packed))
        cfg = self.model.config
        if not (self.model.training and cfg.mlp_class == "moe"):  # evaluation reports the LM loss alone
            return token_loss_sum(self.model, inputs, targets, self.precision, self.hidden_fn, **packing), {}
        # Mixture of experts: + coef * the router's load-balancing loss, per unit, as transformers adds it to
        # its mean loss (over every input token, as transformers without an attention mask).
        with collect_router_logits(self.model) as router_logits:
            loss_sum = token_loss_sum(self.model, inputs, targets, self.precision, self.hidden_fn, **packing)
        aux = load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok)
        units = self.units(batch)
        return loss_sum + cfg.router_aux_loss_coef * units * aux, {"aux_loss": aux.detach() * units}
