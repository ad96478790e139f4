"""GRPO's sampling side: completions from the model being trained, the padded batch they become, and the
per-token log-probs of a completion under any policy.

Completions come from engine.infer.generate (the engine's KV-cache decoder, batched): prompts of equal
length decode together, G rows each, so no row ever attends to padding. A completion ends at its first EOS
(kept, as TRL does: the model learns to stop) or at grpo.max_completion_length.

A rollout batch (what the GRPO objective trains on) is a dict of tensors, N = completions, T = longest
prompt + completion of the batch:
  ids [N, T] long      prompt + completion, right-padded (causal attention: real tokens never see the pad)
  targets [N, T] long  targets[t] = ids[t + 1] where ids[t + 1] is a completion token, else IGNORE_INDEX
  advantages [N]       float32, group-normalized rewards
  old_logps, ref_logps [N, T] float32 (optional): the sampling policy's and the reference's log-probs
"""
from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import torch

import kernels
from engine.data.sampler import IGNORE_INDEX
from engine.infer.generate import generate
from engine.train.objectives import AMP_DTYPES

logger = logging.getLogger("engine.train.rollouts")


def stop_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids that end a completion: the tokenizer's EOS (a chat model's end-of-turn) and the model config's."""
    eos = model.config.eos_token_id
    ids = [tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _cut(row: list[int], eos: tuple[int, ...]) -> list[int]:
    """A generated row up to and including its first EOS (the rest is the decoder's padding)."""
    for i, token in enumerate(row):
        if token in eos:
            return row[:i + 1]
    return row


@torch.no_grad()
def sample(model, prompts: list[list[int]], per_prompt: int, max_new_tokens: int, *, eos: tuple[int, ...],
           temperature: float = 0.0, top_p=None, top_k=None, seed: int = 0, max_rows: int = 256) -> list[list[int]]:
    """`per_prompt` completions (token lists, EOS kept) of each prompt, prompt-major: completion i*G+g is
    prompt i's g-th. Equal-length prompts decode in one batch of up to max_rows rows; seeds derive from `seed`."""
    was_training = model.training
    model.eval()
    out: list = [None] * (len(prompts) * per_prompt)
    by_len = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    chunk = max(1, max_rows // per_prompt)
    try:
        for length in sorted(by_len):
            for start in range(0, len(by_len[length]), chunk):
                group = by_len[length][start:start + chunk]
                ids = torch.tensor([prompts[i] for i in group], device=model.output_weight.device)
                ids = ids.repeat_interleave(per_prompt, dim=0)  # (len(group) * G, length)
                call_seed = int(np.random.SeedSequence([seed, length, start]).generate_state(1)[0])
                rows = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                eos_token_id=list(eos), seed=call_seed)[:, length:].tolist()
                for k, i in enumerate(group):
                    for g in range(per_prompt):
                        out[i * per_prompt + g] = _cut(rows[k * per_prompt + g], eos)
    finally:
        model.train(was_training)
    return out


def pack(prompts: list[list[int]], completions: list[list[int]], per_prompt: int) -> dict:
    """The ids/targets of a rollout batch (see the module docstring); completion i belongs to prompt i // G."""
    rows = [list(prompts[i // per_prompt]) + c for i, c in enumerate(completions)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (row, c) in enumerate(zip(rows, completions)):
        ids[i, :len(row)] = torch.tensor(row)
        start = len(row) - len(c)  # first completion token
        if c:
            targets[i, start - 1:len(row) - 1] = torch.tensor(c)
    return {"ids": ids, "targets": targets}


def completion_logps(model, ids: torch.Tensor, targets: torch.Tensor, precision: str = "fp32",
                     hidden_fn=None, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets | ids) per position [N, T] float32 (0 where targets is IGNORE_INDEX), differentiable,
    under the sampling distribution softmax(logits / temperature) (as TRL scores its completions).

    Only the completion positions reach the LM head (fused, kernels.linear_cross_entropy), so [N, T, V]
    logits never exist; h / temperature before the head is logits / temperature.
    """
    h = (hidden_fn or model.hidden_states)(ids)  # (N, T, C)
    keep = targets != IGNORE_INDEX
    hs, w = h[keep], model.output_weight  # (M, C)
    if temperature != 1.0:
        hs = hs / temperature
    if precision != "fp32":  # what autocast would do to the head matmul, done explicitly for the fused op
        hs, w = hs.to(AMP_DTYPES[precision]), w.to(AMP_DTYPES[precision])
    nll = kernels.linear_cross_entropy(hs, w, targets[keep], ignore_index=IGNORE_INDEX, reduction="none",
                                       out_dtype=torch.float32)  # (M,)
    logps = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
    logps[keep] = -nll
    return logps


def decode_all(tokenizer, completions: list[list[int]], eos: tuple[int, ...]) -> list[str]:
    """Completion texts as the rewards see them: EOS and other special tokens removed."""
    return [tokenizer.decode([t for t in c if t not in eos], skip_special_tokens=True) for c in completions]
