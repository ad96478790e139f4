"""Where a QLoRA step's peak RSS goes: resident memory sampled every millisecond by a thread, attributed to the
phase of the step running then (forward, fused loss, backward with its recomputed blocks and dequantized
tiles, optimizer), next to the bytes each part should take by arithmetic. Used by bench/bench_qlora.py.

RSS is read from /proc/self/statm (Linux); the sampler sleeps between reads, so a spike shorter than a
millisecond can be missed, while ru_maxrss (the headline number) cannot miss it.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

MB = 2**20
PHASES = ("forward", "loss", "backward", "optimizer")


def rss() -> int:
    """This process's resident set now, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PhaseSampler:
    """Peak RSS per phase of a training step; phases are marked by hooks on the model and the optimizer."""

    def __init__(self, model, optimizer):
        self.phase, self.peaks, self._stop = None, {}, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        model.layers[0].register_forward_pre_hook(self._on_first_block)
        model.norm.register_forward_hook(self._on_final_norm)
        optimizer.register_step_pre_hook(lambda *_: self._mark("optimizer"))
        optimizer.register_step_post_hook(lambda *_: self._mark(None))

    def _mark(self, phase) -> None:
        self._record()
        self.phase = phase

    def _on_first_block(self, *_):
        if self.phase is None:  # later calls are the checkpointed recompute inside backward
            self._mark("forward")

    def _on_final_norm(self, _module, _inputs, out):
        self._mark("loss")  # the fused loss computes its gradient in forward, so this spans it
        if out.requires_grad:
            out.register_hook(lambda g: self._mark("backward"))

    def _record(self) -> None:
        if self.phase is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._record()
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def expected_parts(model, batch: int, seq: int) -> dict:
    """The bytes each part of a QLoRA step should hold, by arithmetic (MB)."""
    import kernels.ops.linear_cross_entropy as lce
    from engine.quant import loss_chunk_rows, quantized_layers
    from kernels.ops import quant_linear

    cfg = model.config
    emb = model.embed.weight
    head_tied = model.output_weight.data_ptr() == emb.data_ptr()
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quant = sum(layer.quantized_bytes() for layer in quantized_layers(model).values())
    frozen_dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad)
    tokens, item = batch * seq, 2  # bf16 autocast
    chunk = (loss_chunk_rows(model, tokens, cfg.vocab_size, item)
             or lce.default_chunk_size(tokens, cfg.vocab_size, item))
    widest = max((layer.out_features * layer.in_features for layer in quantized_layers(model).values()), default=0)
    return {
        "token embedding" + (" (tied head)" if head_tied else ""): emb.numel() * emb.element_size() / MB,
        "other frozen dense (norms, biases)": (frozen_dense - emb.numel() * emb.element_size()) / MB,
        "quantized block linears": quant / MB,
        "LoRA params + grads (fp32)": 2 * lora * 4 / MB,
        "AdamW state (fp32 m, v)": 2 * lora * 4 / MB,
        "checkpointed block inputs (bf16)": cfg.num_layers * tokens * cfg.hidden_size * item / MB,
        "one block's recompute (MLP dominated)": 6 * tokens * cfg.intermediate_size * item / MB,
        "fused loss logits chunk (bf16)": chunk * cfg.vocab_size * item / MB,
        "dequantized tile (bf16)": min(widest, quant_linear.TILE_ELEMS) * item / MB,
    }
