"""Reward functions for GRPO (`grpo.rewards`): built-ins by name, or any "module:function".

A reward function is called once per micro-batch as `fn(prompts, completions, **fields)`, TRL's convention:
prompts (each a string or a message list, as in the data line), completions (decoded strings) and, per extra
field of the data lines (e.g. `answer`), the list of that field's values, one per completion. It returns one
float per completion (None is not allowed: every completion must be scored). A function that cannot be
imported, returns the wrong count, a non-number, or NaN/inf is a `RewardError` naming it.
"""
from __future__ import annotations

import importlib
import math
import numbers
import re
from dataclasses import dataclass
from typing import Callable

import torch

from engine.config import ConfigError

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_MARKED = (re.compile(r"####\s*(.+)"), re.compile(r"\\boxed\{([^{}]*)\}"),
           re.compile(r"answer is[:\s]*(.+)", re.IGNORECASE))  # explicit final-answer markers, first match wins


class RewardError(ValueError):
    """A reward function failed or returned something other than one finite number per completion."""


def final_answer(text: str) -> str:
    """The final answer of a completion: after '####', inside \\boxed{}, after 'answer is', else its last number.

    >>> final_answer("14 + 11 equals 25.")
    '25'
    """
    for marker in _MARKED:
        found = marker.findall(text)
        if found:
            text = found[-1]
            break
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else text.strip().rstrip(".").strip()


def _same_answer(got: str, want) -> bool:
    """Numbers compare as numbers (`25.0` == `25`), anything else as stripped strings."""
    want = str(want).strip().replace(",", "")
    try:
        return math.isclose(float(got), float(want), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return got == want


def exact_match(prompts, completions, *, answer_field: str = "answer", **fields) -> list[float]:
    """1.0 where the completion's final answer (see final_answer) equals the row's `answer_field`, else 0.0."""
    if answer_field not in fields:
        raise RewardError(f"exact_match: the data lines have no {answer_field!r} field (grpo.answer_field); "
                          f"fields: {sorted(fields)}")
    return [float(_same_answer(final_answer(c), a)) for c, a in zip(completions, fields[answer_field])]


def format_check(prompts, completions, *, pattern: str, **fields) -> list[float]:
    """1.0 where re.search(pattern, completion) matches (DOTALL), else 0.0."""
    regex = re.compile(pattern, re.DOTALL)
    return [float(regex.search(c) is not None) for c in completions]


@dataclass(frozen=True)
class Reward:
    """A resolved reward: its config name, the function, and the keyword arguments a built-in takes."""

    name: str
    fn: Callable
    weight: float
    options: dict


def _import(name: str) -> Callable:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"grpo.rewards: {name!r} is neither a built-in (exact_match, format) nor "
                          f"'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"grpo.rewards: cannot import {name!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: {name!r} is not callable")
    return fn


def resolve_rewards(grpo) -> list[Reward]:
    """The rewards of a GRPOConfig, imported and checked once at start-up (ConfigError names a bad one)."""
    weights = grpo.reward_weights or (1.0,) * len(grpo.rewards)
    out = []
    for name, weight in zip(grpo.rewards, weights):
        if name == "exact_match":
            out.append(Reward(name, exact_match, float(weight), {"answer_field": grpo.answer_field}))
        elif name == "format":
            try:
                re.compile(grpo.format_pattern)
            except re.error as e:
                raise ConfigError(f"grpo.format_pattern: not a valid regex ({e})") from None
            out.append(Reward(name, format_check, float(weight), {"pattern": grpo.format_pattern}))
        else:
            out.append(Reward(name, _import(name), float(weight), {}))
    return out


def score(rewards: list[Reward], prompts: list, completions: list[str], fields: list[dict]) -> torch.Tensor:
    """Rewards [N, F] (float32) of N completions under F functions; RewardError names a function that misbehaves."""
    columns = {k: [f.get(k) for f in fields] for k in dict.fromkeys(k for f in fields for k in f)}
    out = torch.empty(len(completions), len(rewards), dtype=torch.float32)
    for j, reward in enumerate(rewards):
        try:
            values = reward.fn(prompts, completions, **columns, **reward.options)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward {reward.name!r} failed: {type(e).__name__}: {e}") from e
        out[:, j] = _checked(reward.name, values, len(completions))
    return out


def _checked(name: str, values, n: int) -> torch.Tensor:
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward {name!r}: expected a list of {n} floats, got {type(values).__name__}") from None
    if len(values) != n:
        raise RewardError(f"reward {name!r}: returned {len(values)} values for {n} completions")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"reward {name!r}: value {i} is {v!r} ({type(v).__name__}), not a number")
        if not math.isfinite(v):
            raise RewardError(f"reward {name!r}: value {i} is {v} (NaN/inf); a reward must be a finite number")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)
