"""GRPO (Group Relative Policy Optimization, DeepSeekMath; TRL's GRPOTrainer formulas) as an Objective.

Per optimizer step, `prepare` turns the step's prompt micro-batches into rollout batches (engine.train.rollouts):
G completions per prompt sampled with the current policy, scored by the reward functions, advantages
normalized within each group of G. `forward` then takes the clipped-ratio loss on them:

  ratio_t = exp(logp_t - old_logp_t)        old = the sampling policy (= logp, detached, when num_iterations 1)
  loss_t  = -min(ratio_t A, clip(ratio_t, 1 - eps, 1 + eps_high) A) + beta * KL_t
  KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (k3 estimator; reference = LoRA off, or a frozen copy)

normalized by `units` (the loop divides by the units of the whole step, every micro-batch and rank):
  grpo     units = completions;  each completion contributes its token mean
  dapo     units = completion tokens of the step
  dr_grpo  units = completions x max_completion_length
which is TRL's normalization when every micro-batch holds the same number of completions (ours always do:
train.batch_size prompts x G). With num_iterations k, one generation serves k optimizer steps (the prompt
source repeats its draw); old log-probs are taken right after sampling.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time

import numpy as np
import torch

from engine.adapters.lora import adapters_disabled, is_lora
from engine.train.objectives import Objective, autocast
from engine.train.rewards import resolve_rewards, score
from engine.train.rollouts import completion_logps, decode_all, pack, sample, stop_ids

logger = logging.getLogger("engine.train.grpo")
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """Advantages [N] of rewards [N] in groups of `group` consecutive completions: reward - group mean, divided
    by the group's (scale "group") or all N rewards' (scale "batch") unbiased std + 1e-4, or not ("none")."""
    grouped = rewards.view(-1, group)  # (prompts, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    std = grouped.std(dim=1).repeat_interleave(group) if scale == "group" else rewards.std().expand_as(rewards)
    return centred / (std + STD_EPS)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _step_rewards(total: torch.Tensor) -> torch.Tensor:
    """This rank's rewards [N] of the step, with every other rank's under torchrun (same N on every rank)."""
    if _rank_world()[1] == 1:
        return total
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL gathers CUDA tensors only
    local = total.to(torch.device("cuda", torch.cuda.current_device())) if nccl else total.contiguous()
    parts = [torch.empty_like(local) for _ in range(_rank_world()[1])]
    torch.distributed.all_gather(parts, local)
    return torch.cat(parts).to(total.device)


def grpo_token_loss(logps, old_logps, ref_logps, advantages, mask, *, epsilon_low: float, epsilon_high: float,
                    beta: float, kl_correction: bool = True) -> tuple[torch.Tensor, dict]:
    """Per-token loss [N, T] of the clipped-ratio objective (+ beta * k3 KL, times the ratio when kl_correction),
    and per-token stats [N, T] (`clipped`: the ratio's clip is active for this token's sign of advantage; `kl`)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    stats = {"clipped": (((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))).float()}
    if beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * (kl * ratio if kl_correction else kl)
        stats["kl"] = kl.detach()
    return loss * mask, stats


def grpo_loss_sum(token_loss, mask, loss_type: str) -> torch.Tensor:
    """The loss summed over the batch's units (see the module docstring); token_loss [N, T] is already masked."""
    if loss_type == "grpo":
        return (token_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    return token_loss.sum()  # dapo and dr_grpo differ in their units only


def grpo_units(mask: torch.Tensor, loss_type: str, max_completion_length: int) -> int:
    """Normalization units of a rollout batch (mask [N, T] of its completion tokens)."""
    if loss_type == "grpo":
        return mask.shape[0]
    if loss_type == "dapo":
        return int(mask.sum())
    return mask.shape[0] * max_completion_length


class GRPO(Objective):
    """The GRPO objective: batches are rollout dicts made by `prepare` from the prompt source's lists of Prompt."""

    def __init__(self, model, tokenizer, grpo, *, precision: str = "fp32", seed: int = 0, hidden_fn=None,
                 reference=None):
        super().__init__()
        self.model, self.tokenizer, self.cfg, self.precision, self.seed = model, tokenizer, grpo, precision, seed
        self.hidden_fn = hidden_fn
        self.rewards = resolve_rewards(grpo)
        self.eos = stop_ids(model, tokenizer)
        self._frozen = (reference,)  # a tuple: not a submodule (no parameters in the optimizer, DDP or checkpoints)
        self._cached = None  # (generation index, rollout batches): reused for num_iterations steps

    # ------------------------------------------------------------------ sampling (once per generation)
    def prepare(self, batches: list, step: int) -> tuple[list, dict]:
        """Rollout batches for the prompt micro-batches of `step`, and the step's sampling metrics."""
        k = self.cfg.num_iterations
        if self._cached is not None and self._cached[0] == step // k:
            return self._cached[1], {"gen_time_s": 0.0}
        if step % k:
            logger.warning("grpo: step %d reuses the rollouts of step %d, which this process did not sample "
                           "(resumed mid-generation): sampling them again with the current weights", step,
                           step - step % k)
        started = time.perf_counter()
        rank, world = _rank_world()
        rollouts, texts = [], []
        for micro, prompts in enumerate(batches):
            # Seeded by the micro-batch's slot in the step (engine.data.sampler: micro * world + rank), the slot
            # its prompts come from: N ranks x accum a sample what one process x accum N*a samples, by
            # construction. (The trailing 0 keeps single-process seeds what they were.)
            slot = micro * world + rank
            seed = int(np.random.SeedSequence([self.seed, step // k, slot, 0]).generate_state(1)[0])
            rollout, text = self._sample(prompts, seed)
            rollouts.append(rollout)
            texts.append(text)
        gen_time = time.perf_counter() - started
        metrics = self._score_step(rollouts, texts, batches)
        if k > 1 or self.cfg.beta != 0.0:
            self._add_logps(rollouts)
        metrics["gen_time_s"] = gen_time
        metrics["gen_tokens_per_s"] = metrics.pop("_generated") / max(gen_time, 1e-9)
        self._cached = (step // k, rollouts)
        return rollouts, metrics

    def _sample(self, prompts, seed: int) -> tuple[dict, list]:
        c = self.cfg
        ids = [list(p.ids) for p in prompts]
        completions = sample(self.model, ids, c.num_generations, c.max_completion_length, eos=self.eos,
                             temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, seed=seed)
        return pack(ids, completions, c.num_generations), completions

    def _score_step(self, rollouts: list, completions: list, batches: list) -> dict:
        """Rewards and advantages of every rollout batch of the step (advantages written into the batches)."""
        G, parts = self.cfg.num_generations, []
        for rollout, done, prompts in zip(rollouts, completions, batches):
            rows = [p for p in prompts for _ in range(G)]
            texts = decode_all(self.tokenizer, done, self.eos)
            parts.append(score(self.rewards, [p.text for p in rows], texts, [p.fields for p in rows]))
        per_fn = torch.cat(parts)  # (N step, F)
        weights = torch.tensor([r.weight for r in self.rewards])
        total = per_fn @ weights
        if self.cfg.scale_rewards == "batch":  # std over the whole step: every micro-batch of every rank
            std = _step_rewards(total).std()
            adv = (group_advantages(total, G, "none") / (std + STD_EPS)).split([len(p) for p in parts])
        else:
            adv = [group_advantages(t, G, self.cfg.scale_rewards) for t in (total.split([len(p) for p in parts]))]
        for rollout, a in zip(rollouts, adv):
            rollout["advantages"] = a
        lengths = torch.tensor([len(c) for done in completions for c in done], dtype=torch.float32)
        ended = torch.tensor([bool(c) and c[-1] in self.eos for done in completions for c in done])
        zero_std = (total.view(-1, G).std(dim=1) < 1e-6).float()
        metrics = {"reward": float(total.mean()), "reward_std": float(total.std()),
                   "completion_length": float(lengths.mean()), "truncated_ratio": float((~ended).float().mean()),
                   "frac_reward_zero_std": float(zero_std.mean()), "_generated": float(lengths.sum())}
        for j, r in enumerate(self.rewards):
            metrics[f"rewards/{r.name}/mean"] = float(per_fn[:, j].mean())
            metrics[f"rewards/{r.name}/std"] = float(per_fn[:, j].std())
        return metrics

    @torch.no_grad()
    def _add_logps(self, rollouts: list) -> None:
        """old_logps (num_iterations > 1: the policy that sampled) and ref_logps (beta > 0), before any update."""
        device = self.model.output_weight.device
        for rollout in rollouts:
            ids, targets = rollout["ids"].to(device), rollout["targets"].to(device)
            with autocast(device, self.precision):
                if self.cfg.num_iterations > 1:
                    rollout["old_logps"] = self._logps(self.model, ids, targets).cpu()
                if self.cfg.beta != 0.0:
                    with self._reference() as ref:
                        rollout["ref_logps"] = self._logps(ref, ids, targets).cpu()

    def _logps(self, model, ids, targets):
        hidden_fn = self.hidden_fn if model is self.model else None
        return completion_logps(model, ids, targets, self.precision, hidden_fn, self.cfg.temperature)

    @contextlib.contextmanager
    def _reference(self):
        """The reference policy: this model with its adapters off (LoRA), or the frozen copy (full fine-tuning)."""
        if self._frozen[0] is not None:
            yield self._frozen[0]
        else:
            with adapters_disabled(self.model):
                yield self.model

    # ------------------------------------------------------------------ the loss (per micro-batch)
    def units(self, batch) -> int:
        mask = batch["targets"] != -100
        return grpo_units(mask, self.cfg.loss_type, self.cfg.max_completion_length)

    def forward(self, batch) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        logps = self._logps(self.model, batch["ids"], batch["targets"])
        mask = (batch["targets"] != -100).float()
        old = batch.get("old_logps", logps.detach())
        token_loss, stats = grpo_token_loss(logps, old, batch.get("ref_logps"), batch["advantages"], mask,
                                            epsilon_low=c.epsilon, epsilon_high=c.clip_high, beta=c.beta,
                                            kl_correction=c.use_bias_correction_kl)
        loss_sum = grpo_loss_sum(token_loss, mask, c.loss_type)
        units = grpo_units(mask, c.loss_type, c.max_completion_length)
        tokens = mask.sum().clamp(min=1.0)  # stats: token means of this batch, weighted by its units
        metrics = {name: float((value * mask).sum() / tokens) * units for name, value in stats.items()}
        return loss_sum, {"clip_ratio" if k == "clipped" else k: v for k, v in metrics.items()}


def build_grpo(cfg, model, tokenizer, hidden_fn=None) -> GRPO:
    """The GRPO objective of a run config; full fine-tuning with beta > 0 keeps a frozen copy as the reference."""
    reference = None
    if cfg.grpo.beta != 0.0 and not is_lora(model):
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    return GRPO(model, tokenizer, cfg.grpo, precision=cfg.train.precision, seed=cfg.train.seed,
                hidden_fn=hidden_fn, reference=reference)
