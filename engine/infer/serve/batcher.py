"""Continuous batching: one thread owns the model, and requests join and leave a running batch between steps.

Every iteration of the loop:
  1. evicts finished or cancelled sequences (the last active row is copied into the hole, so the batch
     stays rows [0, n) of one per-row KV cache and a step reads one contiguous slice);
  2. admits waiting requests while rows are free: each prompt is prefilled on its own into its row
     (batch 1, the same path as engine.infer.generate) and its first token sampled;
  3. runs ONE batched decode forward over all n active rows. Rows hold different lengths: the per-row
     cache writes each row's token at its own length and masks every slot past it, so padding never
     leaks into a row's attention. Up to FUSED_MAX_ROWS rows of a model the fused decode step implements
     take it (engine.infer.decode_step: one compiled call for the n rows), others the eager forward;
  4. samples each row with its request's own temperature / top_p / torch.Generator, hands the token to
     the request's callback, and marks sequences that hit EOS or max_tokens as done.

B = active rows (n), V = vocab. Nothing here knows about HTTP or text: engine.infer.serve.app turns tokens
into text, stop strings and OpenAI responses, and cancels a sequence when its client goes away.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from engine.infer.decode_step import FUSED_MAX_ROWS, fused_decoder
from engine.infer.generate import sample_next

log = logging.getLogger("engine.infer.serve")


class QueueFull(RuntimeError):
    """Too many requests are already waiting for a row."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded; `eos_ids` end it with finish reason "stop"."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: Optional[float] = None
    seed: Optional[int] = None
    eos_ids: tuple[int, ...] = ()


@dataclass(eq=False)
class Sequence:
    """One request in the batcher. `emit(kind, value)` is called from the batcher thread:
    ("token", id) per generated token, then once ("done", "stop" | "length" | "cancelled") or ("error", message)."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[str, object], None]
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False  # set from any thread; the batcher evicts the row before its next step

    def __post_init__(self):
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed % 2**64)
        else:
            self.generator.seed()  # nondeterministic, and independent of every other request

    def cancel(self) -> None:
        """Free this sequence's row (a no-op once it is done)."""
        self.cancelled = True


class Batcher:
    """Owns `model` on a background thread and decodes every active request in one batched forward per step.

    max_batch rows of max_len tokens (prompt + completion) each are preallocated once; up to max_waiting
    requests queue for a free row, beyond that `submit` raises QueueFull.
    """

    def __init__(self, model, max_batch: int = 16, max_len: int = 2048, max_waiting: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch: expected a positive integer, got {max_batch}")
        self.model = model.eval()
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.cache = model.new_cache(max_batch, max_len, per_row=True)
        self.max_len = self.cache.max_len  # capped at the model's max_position_embeddings
        self._fused = fused_decoder(self.model, self.cache)  # None: decode with the eager forward
        self.active: list[Sequence] = []  # row i of the cache belongs to active[i]
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._closed = False
        # Counters for /health, tests and benches: peak_batch > 1 proves requests were decoded together.
        self.stats = dict(requests=0, finished=0, cancelled=0, errors=0, steps=0, tokens=0, peak_batch=0)
        self._thread = threading.Thread(target=self._run, name="engine-serve-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public, any thread
    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[str, object], None]) -> Sequence:
        """Queue a request; its tokens arrive through `emit` (see Sequence). Raises ValueError if it cannot fit."""
        if not prompt:
            raise ValueError("prompt: empty; give at least one token")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens: expected a positive integer, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context of {self.max_len} tokens")
        seq = Sequence(list(prompt), params, emit)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is shut down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; try again later")
            self._waiting.append(seq)
            self.stats["requests"] += 1
            self._cond.notify()
        return seq

    def generate(self, prompt: list[int], params: SamplingParams) -> tuple[list[int], str]:
        """Blocking helper: (generated ids, finish reason) of one request."""
        done = threading.Event()
        out: list = []

        def emit(kind, value):
            out.append((kind, value))
            if kind != "token":
                done.set()

        self.submit(prompt, params, emit)
        done.wait()
        kind, value = out[-1]
        if kind == "error":
            raise RuntimeError(value)
        return [v for k, v in out if k == "token"], value

    @property
    def load(self) -> dict:
        return dict(active=len(self.active), waiting=len(self._waiting), max_batch=self.max_batch, **self.stats)

    def close(self) -> None:
        """Stop the loop; requests still running or waiting end with ("done", "cancelled")."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop (batcher thread only)
    def _run(self):
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self.active:
                    self._cond.wait()
                if self._closed:
                    break
                new = []
                while self._waiting and len(self.active) + len(new) < self.max_batch:
                    new.append(self._waiting.popleft())
            try:
                with torch.inference_mode():
                    self._evict()
                    for seq in new:
                        self._prefill(seq)
                    self._evict()
                    if self.active:
                        self._decode()
            except Exception as e:  # a failing forward must not take the server down: fail this batch, go on
                log.exception("batcher step failed")
                for seq in [*self.active, *new]:
                    if not seq.done:
                        self._finish(seq, "error", f"{type(e).__name__}: {e}")
                        self.stats["errors"] += 1
                self.active = []
        for seq in [*self.active, *self._waiting]:
            if not seq.done:
                self._finish(seq, "done", "cancelled")

    def _prefill(self, seq: Sequence):
        if seq.cancelled:
            self._finish(seq, "done", "cancelled")
            self.stats["cancelled"] += 1
            return
        r = len(self.active)
        # Row r as a batch-1 cache starting empty: exactly engine.infer.generate's prefill (plain causal attention).
        slot = self.cache.rows(r, r + 1)
        slot.lengths, slot.pos = None, 0
        ids = torch.tensor([seq.prompt], device=self.cache.k.device)
        h = self.model.hidden_states(ids, cache=slot)[:, -1]  # (1, C)
        self.cache.lengths[r] = len(seq.prompt)
        self.active.append(seq)
        self._take(seq, self.model.lm_head(h))

    def _decode(self):
        n = len(self.active)
        tokens = torch.tensor([s.tokens[-1] for s in self.active], device=self.cache.k.device)  # (B,)
        rows = self.cache.rows(0, n)
        if self._fused is not None and n <= FUSED_MAX_ROWS:  # row b writes and attends at its own length
            logits = self._fused.step(tokens, rows.lengths)  # (B, V)
            rows.advance(1)
        else:
            logits = self.model.lm_head(self.model.hidden_states(tokens[:, None], cache=rows)[:, -1])  # (B, V)
        greedy = logits.argmax(dim=-1).tolist() if any(s.params.temperature <= 0 for s in self.active) else None
        for i, seq in enumerate(self.active):
            self._take(seq, logits[i:i + 1], greedy[i] if greedy and seq.params.temperature <= 0 else None)
        self.stats["steps"] += 1
        self.stats["peak_batch"] = max(self.stats["peak_batch"], n)

    def _take(self, seq: Sequence, logits, token: Optional[int] = None):
        """Sample seq's next token from logits [1, V] (unless already picked), hand it out, and decide if it ends."""
        p = seq.params
        if token is None:
            token = int(sample_next(logits, p.temperature, None, p.top_p, seq.generator)[0])
        seq.tokens.append(token)
        self.stats["tokens"] += 1
        if not self._send(seq, "token", token):
            return
        if token in p.eos_ids:
            self._finish(seq, "done", "stop")
        elif len(seq.tokens) >= p.max_tokens or len(seq.prompt) + len(seq.tokens) >= self.max_len:
            self._finish(seq, "done", "length")

    def _send(self, seq: Sequence, kind: str, value) -> bool:
        try:
            seq.emit(kind, value)
            return True
        except Exception:  # the listener is gone (e.g. its event loop closed): treat it as a disconnect
            seq.cancelled = True
            return False

    def _finish(self, seq: Sequence, kind: str, value):
        seq.done = True
        self.stats["finished"] += 1
        self._send(seq, kind, value)

    def _evict(self):
        """Drop done or cancelled rows; the last row moves into each hole so the batch stays rows [0, n)."""
        i = 0
        while i < len(self.active):
            seq = self.active[i]
            if not (seq.done or seq.cancelled):
                i += 1
                continue
            if not seq.done:  # cancelled by its client mid-generation
                self._finish(seq, "done", "cancelled")
                self.stats["cancelled"] += 1
            last = len(self.active) - 1
            if i != last:
                n = int(self.cache.lengths[last])  # copy only the filled slots
                self.cache.k[:, i, :, :n] = self.cache.k[:, last, :, :n]
                self.cache.v[:, i, :, :n] = self.cache.v[:, last, :, :n]
                self.cache.lengths[i] = n
                self.active[i] = self.active[last]
            self.active.pop()
