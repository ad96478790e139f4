"""Prompt datasets for RL fine-tuning (data.format "prompts"): one prompt per .jsonl line, plus any fields.

A line is {"prompt": "text"} (encoded as is, like TRL's standard format), {"prompt": [messages]} or
{"messages": [messages]} (rendered with the chat template and its generation prompt, TRL's conversational
format); every other key (e.g. "answer") travels with the prompt to the reward functions. Prompts longer than
data.seq_len tokens are dropped and counted. Rows are sampled with the one sampler (engine.data.sampler), so a
micro-batch of prompts is a pure function of (seed, step, micro, rank) and a resumed run replays exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from engine.data.documents import DataError, expand_paths, iter_jsonl
from engine.data.sampler import Sampled

logger = logging.getLogger("engine.data.prompts")


@dataclass(frozen=True)
class Prompt:
    """One prompt: its token ids, what the reward functions see of it (`text`), and the line's other fields."""

    ids: tuple[int, ...]
    text: object  # the line's prompt: a string, or the message list
    fields: dict
    where: str  # "file:LINE"


def _render(record: dict, where: str, tokenizer) -> tuple[list[int], object]:
    """(prompt ids, prompt as given) of one parsed line."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
    key = "prompt" if "prompt" in record else "messages" if "messages" in record else None
    if key is None:
        raise DataError(f"{where}: expected a 'prompt' (string or message list) or 'messages' key, got keys "
                        f"{sorted(record)}")
    value = record[key]
    if isinstance(value, str) and key == "prompt":
        if not value:
            raise DataError(f"{where}: prompt: empty string")
        return tokenizer.encode(value), value
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise DataError(f"{where}: {key}: expected a non-empty list of {{'role', 'content'}} messages")
    if value[-1].get("role") == "assistant":
        raise DataError(f"{where}: {key}: the last message is the assistant's; a prompt ends where the model "
                        f"starts answering")
    return tokenizer.apply_chat_template(value, add_generation_prompt=True, tokenize=True), value


def read_prompts(patterns, tokenizer, max_len: int, where: str = "data.train") -> list[Prompt]:
    """Every prompt of the .jsonl files `patterns`, in file order; prompts over max_len tokens are dropped."""
    prompts, dropped = [], 0
    for path in expand_paths(patterns, where):
        for record, line, _ in iter_jsonl(path):
            ids, text = _render(record, line, tokenizer)
            if len(ids) > max_len:
                dropped += 1
                continue
            fields = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
            prompts.append(Prompt(tuple(ids), text, fields, line))
    if dropped:
        logger.warning("%s: %d prompts longer than data.seq_len=%d tokens dropped", where, dropped, max_len)
    if not prompts:
        raise DataError(f"{where}: no prompts (every line was longer than data.seq_len={max_len} tokens, or the "
                        f"files are empty)")
    return prompts


class PromptSet(Sampled):
    """A list of prompts that the loop samples like any batch source; a batch is a list of `Prompt`.

    `repeat` steps share one draw (GRPO's num_iterations: the prompts of a generation serve that many steps).
    """

    def __init__(self, prompts: list[Prompt], seed: int, repeat: int = 1):
        self.prompts, self.seed, self.repeat = prompts, seed, repeat

    def __len__(self) -> int:
        return len(self.prompts)

    def _gather(self, rows):
        return [self.prompts[i] for i in rows]

    def batch(self, step: int, micro: int = 0, *, batch_size: int, accum: int = 1, rank: int = 0,
              world_size: int = 1):
        """The prompts of micro-batch `micro` of `step` (steps step // repeat * repeat ... share them)."""
        return super().batch(step // self.repeat, micro, batch_size=batch_size, accum=accum, rank=rank,
                             world_size=world_size)


@dataclass(frozen=True)
class PromptData:
    """A prompt run's data: train prompts, and held-out prompts (data.val) or None."""

    train: PromptSet
    val: Optional[list[Prompt]]


def prepare_prompts(data_cfg, tokenizer, seed: int, repeat: int = 1) -> PromptData:
    """Read data.train (and data.val) prompt files; nothing is cached: prompts are few and short."""
    train = read_prompts(data_cfg.train, tokenizer, data_cfg.seq_len)
    val = read_prompts(data_cfg.val, tokenizer, data_cfg.seq_len, where="data.val") if data_cfg.val else None
    logger.info("prompts: %d train%s", len(train), f", {len(val)} held out" if val else "")
    return PromptData(PromptSet(train, seed, repeat), val)
