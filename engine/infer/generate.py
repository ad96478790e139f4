"""KV-cache decoding: one prefill over the prompt, then one token per step, greedy or sampled."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from engine.infer.decode_step import FUSED_MAX_ROWS, fused_decoder


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token per row from logits [B, V] (any float dtype) -> LongTensor [B]."""
    if temperature <= 0.0:  # greedy
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of tokens whose probability reaches top_p (always at least the top one).
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reached top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, pad_token_id):
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids: expected a LongTensor [B, T], got {input_ids.dtype} {list(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids: the prompt is empty; give at least one token (e.g. BOS)")
    V = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= V:
        raise ValueError(f"input_ids: token ids must lie in [0, {V}), got [{int(input_ids.min())}, "
                         f"{int(input_ids.max())}]")
    if pad_token_id is not None and not 0 <= pad_token_id < V:
        raise ValueError(f"pad_token_id: expected an id in [0, {V}), got {pad_token_id}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k: expected a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] >= limit:
        raise ValueError(f"input_ids: prompt of {input_ids.shape[1]} tokens leaves no room under "
                         f"max_position_embeddings={limit}")


@torch.inference_mode()
def generate_stream(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None,
                    eos_token_id: Optional[int | Sequence[int]] = None, seed: Optional[int] = None,
                    pad_token_id: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, LongTensor [B], until max_new_tokens or all hit EOS.

    A sequence that has finished keeps yielding `pad_token_id` (default: its EOS) while others run on,
    as HF does. `eos_token_id=None` uses the model config's; the generation stops at the model's
    max_position_embeddings.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, pad_token_id)
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    B, T = input_ids.shape
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - T)
    cache = model.new_cache(B, T + max_new_tokens)
    # None: the eager forward decodes (also past FUSED_MAX_ROWS rows, where it measured faster)
    fused = fused_decoder(model, cache) if max_new_tokens > 1 and B <= FUSED_MAX_ROWS else None
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens = input_ids
    for i in range(max_new_tokens):
        if i == 0 or fused is None:  # the prompt (T > 1) always goes through the eager forward
            logits = model.lm_head(model.hidden_states(tokens, cache=cache)[:, -1])  # only the last position
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
        elif temperature <= 0.0:  # greedy: the fused step's LM head also picks the argmax
            nxt = fused.step_greedy(tokens[:, 0], torch.full((B,), cache.pos, dtype=torch.long))[1].clone()
            cache.advance(1)
        else:
            logits = fused.step(tokens[:, 0], torch.full((B,), cache.pos, dtype=torch.long))
            cache.advance(1)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        yield nxt
        finished |= torch.isin(nxt, eos)
        if finished.all():
            return
        tokens = nxt[:, None]


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Optional[int | Sequence[int]] = None, seed: Optional[int] = None,
             pad_token_id: Optional[int] = None) -> torch.Tensor:
    """Prompt + generated tokens, LongTensor [B, T + n] (like HF `generate`); see `generate_stream`."""
    squeeze = input_ids.dim() == 1
    ids = input_ids[None] if squeeze else input_ids
    new = list(generate_stream(model, ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
                               pad_token_id))
    out = torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids.clone()
    return out[0] if squeeze else out
