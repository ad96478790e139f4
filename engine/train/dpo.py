"""Preference optimization: DPO and its variants as one Objective (train.objective "dpo", the `dpo` section).

Per pair, with log-probs summed over the completion tokens (l = policy, r = reference; c = chosen, j = rejected;
n = completion tokens; a = l / n, the length-normalized log-prob), beta = dpo.beta, eps = dpo.label_smoothing:
  sigmoid  -(1 - eps) log s(beta d) - eps log s(-beta d),  d = (l_c - r_c) - (l_j - r_j)   (DPO; eps > 0: cDPO)
  hinge    relu(1 - beta d)
  ipo      ((l_c - r_c) / n_c - (l_j - r_j) / n_j - 1 / (2 beta))^2      (TRL's length-normalized IPO)
  simpo    -(1 - eps) log s(beta m) - eps log s(-beta m),  m = a_c - a_j - gamma / beta         (no reference)
  orpo     -a_c - beta log s(log odds),  log odds = (a_c - a_j) - (log(1 - e^a_c) - log(1 - e^a_j)) (no reference)
These are TRL 1.16's DPOTrainer (sigmoid, hinge, ipo; its sigmoid has no label smoothing, cDPO is the formula
above), CPOTrainer loss_type="simpo" with cpo_alpha=0, and ORPOTrainer, per pair. ORPO's NLL term here is each
pair's mean over its chosen completion (the paper's SFT term on the response); TRL's averages over the batch's
chosen tokens with the prompt included: the same number for empty prompts and equal chosen lengths. Units are pairs: the loop divides the summed loss by the pairs of the
whole step, so k micro-batches of b pairs equal one batch of k*b (and N ranks equal one with accumulation).
Chosen and rejected sides run through one forward (the batch's 2B rows, engine.data.preference).

The reference's log-probs, per run (see engine.config.DPOConfig): a LoRA model with its adapters disabled (the
same weights, no copy); a frozen copy of model.from_pretrained (fp32 or bf16), never registered as a submodule
(so never checkpointed, wrapped or optimized); or `ref_logps` carried by the batch (precompute_reference).
Metrics (means per pair, as TRL names them): rewards/chosen, rewards/rejected (beta times the log-ratio to the
reference; beta times a for simpo/orpo), rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F

import kernels
from engine.adapters.lora import adapters_disabled, is_lora
from engine.config import DPOConfig
from engine.data.sampler import IGNORE_INDEX
from engine.train.dpo_packing import pack_pairs
from engine.train.objectives import AMP_DTYPES, Objective

logger = logging.getLogger("engine.train.dpo")


def sequence_logps(model, input_ids, targets, precision: str = "fp32", hidden_fn=None):
    """(summed log-prob fp32 [R], scored tokens int64 [R]) of each row's non-ignored targets [R, T].

    Only the scored positions go through the LM head (fused with log-softmax: [R, T, V] logits never exist)."""
    h = (hidden_fn or model.hidden_states)(input_ids)  # (R, T, C)
    scored = targets != IGNORE_INDEX  # (R, T)
    rows = scored.nonzero()[:, 0]  # (N,) the row of each scored position
    return _head_logps(model, h[scored], targets[scored], rows, input_ids.shape[0], precision), scored.sum(1)


def pair_logps(model, input_ids, targets, precision: str = "fp32", hidden_fn=None):
    """sequence_logps of a preference batch [2B, T] (chosen rows, then rejected), each pair's shared prefix
    computed once (engine.train.dpo_packing): the same values up to float summation order, fewer tokens."""
    packed = pack_pairs(input_ids, targets)
    windows = getattr(model, "_windows", (None,))
    if any(w is not None and w < packed.input_ids.shape[1] for w in windows):  # a sliding window counts row
        return sequence_logps(model, input_ids, targets, precision, hidden_fn)  # slots, not positions: unpacked
    h = (hidden_fn or model.hidden_states)(packed.input_ids, position_ids=packed.position_ids,
                                           attn_mask=packed.attn_mask)  # (B, T', C)
    hs = h.reshape(-1, h.shape[-1])[packed.index]  # (N, C)
    return _head_logps(model, hs, packed.targets, packed.rows, input_ids.shape[0], precision), packed.counts


def _head_logps(model, hs, targets, rows, n_rows: int, precision: str) -> torch.Tensor:
    """Summed log-probs fp32 [n_rows] of targets [N] read from hidden states hs [N, C] (row of each: rows [N])."""
    w = model.output_weight
    if precision != "fp32":  # what autocast would do to the head matmul, done explicitly for the fused op
        hs, w = hs.to(AMP_DTYPES[precision]), w.to(AMP_DTYPES[precision])
    elif hs.dtype != w.dtype:  # a bf16 reference copy under fp32 training
        hs = hs.to(w.dtype)
    nll = kernels.linear_cross_entropy(hs, w, targets, ignore_index=IGNORE_INDEX, reduction="none",
                                       out_dtype=torch.float32,
                                       softcap=getattr(model, "output_softcap", None))  # (N,) Gemma 2's cap
    return torch.zeros(n_rows, dtype=torch.float32, device=nll.device).index_add(0, rows, -nll)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler's split at -ln 2)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(cfg: DPOConfig, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None):
    """(per-pair loss [B], chosen rewards [B], rejected rewards [B]) from [2B] log-probs (chosen rows first)."""
    l_c, l_j = logps.chunk(2)
    n_c, n_j = counts.to(logps.dtype).clamp(min=1).chunk(2)
    beta, eps = cfg.beta, cfg.label_smoothing
    if cfg.loss in ("simpo", "orpo"):
        a_c, a_j = l_c / n_c, l_j / n_j
        if cfg.loss == "simpo":
            m = a_c - a_j - cfg.gamma / beta
            loss = -(1 - eps) * F.logsigmoid(beta * m) - eps * F.logsigmoid(-beta * m)
        else:
            log_odds = (a_c - a_j) - (_log1mexp(a_c) - _log1mexp(a_j))
            loss = -a_c - beta * F.logsigmoid(log_odds)
        return loss, beta * a_c.detach(), beta * a_j.detach()
    r_c, r_j = ref.to(logps.dtype).chunk(2)
    ratio_c, ratio_j = l_c - r_c, l_j - r_j
    d = ratio_c - ratio_j
    if cfg.loss == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif cfg.loss == "hinge":
        loss = torch.relu(1 - beta * d)
    else:  # ipo
        loss = (ratio_c / n_c - ratio_j / n_j - 1 / (2 * beta)) ** 2
    return loss, beta * ratio_c.detach(), beta * ratio_j.detach()


class DPOLoss(Objective):
    """A preference loss over batches of engine.data.preference (units: pairs); the reference as the module doc says.

    `reference`: "adapters" (a LoRA model's base), "copy" (`ref_model`), "batch" (precomputed) or None (simpo/orpo).
    """

    def __init__(self, model, cfg: DPOConfig, precision: str = "fp32", hidden_fn=None, reference=None,
                 ref_model=None):
        super().__init__()
        if reference == "adapters" and not is_lora(model):
            raise ValueError("DPOLoss: reference='adapters' needs a LoRA model")
        if reference == "copy" and ref_model is None:
            raise ValueError("DPOLoss: reference='copy' needs ref_model")
        if (reference is None) == cfg.needs_reference:
            raise ValueError(f"DPOLoss: dpo.loss {cfg.loss!r} {'needs' if cfg.needs_reference else 'takes no'} "
                             "reference")
        self.model, self.cfg, self.precision, self.hidden_fn, self.reference = model, cfg, precision, hidden_fn, reference
        self._ref_model = (ref_model,)  # a tuple: not a submodule (no checkpoint, no DDP/FSDP, no optimizer)

    def units(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def reference_logps(self, batch) -> torch.Tensor:
        """The reference's summed completion log-probs [2B] (no gradient)."""
        if self.reference == "batch":
            if "ref_logps" not in batch:
                raise ValueError("DPOLoss: the batch carries no 'ref_logps' (were they precomputed?)")
            return batch["ref_logps"]
        with torch.no_grad():
            if self.reference == "adapters":
                with adapters_disabled(self.model):
                    return pair_logps(self.model, batch["input_ids"], batch["targets"], self.precision,
                                      self.hidden_fn)[0]
            return pair_logps(self._ref_model[0], batch["input_ids"], batch["targets"], self.precision)[0]

    def forward(self, batch) -> tuple[torch.Tensor, dict]:
        logps, counts = pair_logps(self.model, batch["input_ids"], batch["targets"], self.precision,
                                   self.hidden_fn)  # (2B,): one forward for both sides
        ref = self.reference_logps(batch) if self.reference is not None else None
        loss, reward_c, reward_j = pair_losses(self.cfg, logps, counts, ref)
        l_c, l_j = logps.detach().chunk(2)
        metrics = {"rewards/chosen": float(reward_c.sum()), "rewards/rejected": float(reward_j.sum()),
                   "rewards/accuracies": float((reward_c > reward_j).sum()),
                   "rewards/margins": float((reward_c - reward_j).sum()),
                   "logps/chosen": float(l_c.sum()), "logps/rejected": float(l_j.sum())}
        return loss.sum(), metrics


def frozen_reference(model_dir: str, dtype: torch.dtype, device) -> torch.nn.Module:
    """model.from_pretrained loaded again as the frozen reference (eval mode, no gradients)."""
    from engine.model.transformer import Transformer

    ref = Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
    return ref.requires_grad_(False).eval()


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def pairs_logps(model, pairs, batch_size: int, device, precision: str = "fp32") -> torch.Tensor:
    """Summed completion log-probs fp32 [N, 2] (chosen, rejected) of every pair of `pairs`, in order."""
    from engine.train.objectives import autocast, to_device

    out = []
    with _eval_mode(model):
        for batch in pairs.eval_batches(batch_size):
            batch = to_device(batch, device)
            with autocast(device, precision):
                logps = pair_logps(model, batch["input_ids"], batch["targets"], precision)[0]
            out.append(torch.stack(logps.float().cpu().chunk(2), 1))  # (B, 2)
    return torch.cat(out) if out else torch.zeros(0, 2)


def preference_accuracy(logps: torch.Tensor) -> float:
    """Fraction of pairs [N, 2] whose chosen side has the higher log-prob (ties count half)."""
    margin = logps[:, 0] - logps[:, 1]
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean()) if len(margin) else math.nan
