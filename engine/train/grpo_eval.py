"""Held-out reward of a policy: what a GRPO run is judged by (cli.train prints it before -> after training)."""
from __future__ import annotations

import torch

from engine.train.rewards import resolve_rewards, score
from engine.train.rollouts import decode_all, sample, stop_ids


@torch.no_grad()
def heldout_reward(model, tokenizer, prompts: list, grpo, temperature: float = 0.0) -> dict:
    """Mean rewards of one completion per prompt (greedy by default; engine.data.prompts.Prompt list):
    {"reward": the weighted sum's mean, "rewards/<name>": each function's mean, "prompts": n}."""
    rewards = resolve_rewards(grpo)
    eos = stop_ids(model, tokenizer)
    done = sample(model, [list(p.ids) for p in prompts], 1, grpo.max_completion_length, eos=eos,
                  temperature=temperature, top_p=grpo.top_p, top_k=grpo.top_k, seed=0)
    per_fn = score(rewards, [p.text for p in prompts], decode_all(tokenizer, done, eos), [p.fields for p in prompts])
    total = per_fn @ torch.tensor([r.weight for r in rewards])
    out = {"reward": float(total.mean()), "prompts": len(prompts)}
    out.update({f"rewards/{r.name}": float(per_fn[:, j].mean()) for j, r in enumerate(rewards)})
    return out
