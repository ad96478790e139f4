"""DPO's shared-prefix rows (engine.train.dpo_packing) give the log-probs and gradients of the plain two-row batch.

pair_logps (one row per pair, the prompt computed once) vs sequence_logps (chosen and rejected as separate causal
rows) on tiny transformers-written models, on pairs with prompts of several lengths, equal leading completion
tokens, a rejected side that is a prefix of the chosen one, and padding. fp32; tolerances rtol 1e-5 / atol 1e-5 on
the log-probs (summed over up to 20 tokens) and rtol 1e-4 / atol 1e-6 on the gradients (different summation order).
"""
import pytest
import torch

from engine.data.sampler import IGNORE_INDEX
from engine.model.transformer import Transformer
from engine.train.dpo import pair_logps, sequence_logps
from engine.train.dpo_packing import pack_pairs
from tests.hf_models import save_hf_model

# (prompt, chosen completion, rejected completion) lengths; shared leading completion tokens
SHAPES = [(5, 7, 3, 0), (9, 2, 11, 0), (1, 6, 6, 2), (4, 8, 3, 3)]  # the last: rejected = chosen's first 3 tokens


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sides = []
    for p, c, r, same in SHAPES:
        prompt = torch.randint(3, vocab, (p,), generator=g)
        chosen = torch.randint(3, vocab, (c,), generator=g)
        rejected = torch.cat([chosen[:same], torch.randint(3, vocab, (r - same,), generator=g)])
        sides.append((prompt, chosen, rejected))
    rows = [(pr, c) for pr, c, _ in sides] + [(pr, r) for pr, _, r in sides]
    T = max(len(pr) + len(c) for pr, c in rows) - 1 + 2  # two extra padding columns
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX)
    for i, (pr, c) in enumerate(rows):
        ids = torch.cat([pr, c])
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, len(pr) - 1:len(ids) - 1] = c
    return x, y


def _model(tmp_path, family: str, **overrides) -> Transformer:
    save_hf_model(family, tmp_path / family, **overrides)
    return Transformer.from_pretrained(tmp_path / family)


def _logps_and_grads(model, fn, x, y):
    model.zero_grad(set_to_none=True)
    logps, counts = fn(model, x, y)
    (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()  # distinct weights per side
    return logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("qwen2", {}), ("gemma2", {"sliding_window": 64}),
                                               ("gemma2", {})])
def test_shared_prefix_rows_equal_two_causal_rows(tmp_path, family, overrides):
    model = _model(tmp_path, family, **overrides)  # gemma2 window 8 < the rows: the unpacked path, same answer
    x, y = _batch(model.config.vocab_size)
    ours, counts, grads = _logps_and_grads(model, pair_logps, x, y)
    plain, plain_counts, plain_grads = _logps_and_grads(model, sequence_logps, x, y)
    assert counts.tolist() == plain_counts.tolist() == [c for _, c, _, _ in SHAPES] + [r for _, _, r, _ in SHAPES]
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        scale = plain_grads[name].abs().max().clamp(min=1e-12)
        torch.testing.assert_close(g / scale, plain_grads[name] / scale, rtol=1e-4, atol=1e-6, msg=name)


def test_rows_hold_each_prompt_once_and_the_branches_do_not_see_each_other():
    x, y = _batch(10_000)  # a vocabulary large enough that no two random tokens collide here
    packed = pack_pairs(x, y)
    lengths = [(p + c - 1, p + r - 1, min(p + same, p + c - 1, p + r - 1)) for p, c, r, same in SHAPES]  # n_c, n_j, L
    assert packed.tokens == sum(n_c + n_j - L for n_c, n_j, L in lengths)
    n_c, n_j, L = lengths[0]
    mask = packed.attn_mask[0, 0]
    assert mask[n_c, :L].all() and not mask[n_c, L:n_c].any() and mask[n_c, n_c]  # rejected: prefix + itself
    assert packed.position_ids[0, n_c].item() == L and packed.input_ids[0, n_c] == x[len(SHAPES), L]
