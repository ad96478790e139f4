"""Memory planner: the bytes one rank needs to train a RunConfig, from the shapes alone (nothing is allocated).

B = batch_size, T = seq_len, N = B * T tokens per micro-batch, C = hidden_size, F = intermediate_size,
V = vocab_size, L = num_layers. Per rank:

    peak = weights + optimizer state + what else is alive at the worst moment of a step:
      forward end     saved activations + LM-head/loss workspace + autocast bf16 weight copies
      backward start  saved activations + the head's gradient + the top layer's backward temporaries
      backward end    every gradient + the first layer's activations (the others are freed by then)

Gradients appear while activations are freed, so the peak is below the sum of the rows. Activations
are counted by walking engine/model/transformer.py's Block as autograd records it: each op saves only what its
backward needs given which inputs require grad (a matmul keeps its input only when its weight trains),
in the dtype it has (under autocast every Linear casts its fp32 input to bf16 on its own, and that
copy is what is saved). What the kernels keep is modelled on kernels/: attention saves q, k, v and
the output (SDPA), or also the [T, T] probabilities (kernels/grouped_attention.py: bf16 training on CPU); the
fused LM-head loss holds one chunk of logits (kept across steps on CPU) and computes the head's
gradient during forward. tests/train/test_memory_plan.py holds the estimate to the measured peak of real steps.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.config import ConfigError, LoraConfig, ModelConfig, RunConfig

FP32, HALF = 4, 2  # bytes per element
LOGITS_CHUNK_BYTES = 1 << 27  # kernels/fused_linear_ce.py: logits per chunk of the fused LM-head loss


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes per rank. `peak` is what the run needs; the rows do not all coexist (see module doc)."""

    weights: int  # resident parameters (FSDP: this rank's shard)
    grads: int  # one per trainable parameter, fp32 (FSDP: this rank's shard)
    optimizer: int  # AdamW exp_avg + exp_avg_sq, fp32
    activations: int  # saved for backward (+ one recomputed layer with activation checkpointing)
    workspace: dict  # name -> bytes: what else a step allocates (LM head, weight copies, temporaries ...)
    peak: int
    peak_phase: str  # when the peak happens: "forward end", "backward start" or "backward end"
    total_params: int
    trainable_params: int
    world_size: int
    strategy: str  # "single process", "ddp" or "fsdp"
    device: str  # "cpu" or "cuda": the kernels keep different things on each


# ---------------------------------------------------------------------------- activations


class _T:
    """A tensor, per token: `n` elements of `b` bytes; `rg`: requires grad."""

    def __init__(self, n: int, b: int, rg: bool):
        self.n, self.b, self.rg = n, b, rg


class _BlockWalk:
    """Mirrors Block.forward (engine/model/transformer.py) op by op, adding up what autograd saves per token."""

    def __init__(self, mc: ModelConfig, seq_len: int, amp: bool, param_bytes: int, full: bool,
                 lora: Optional[LoraConfig], kernels: "_Kernels"):
        self.mc, self.T, self.amp, self.param_bytes, self.full = mc, seq_len, amp, param_bytes, full
        self.compute = HALF if amp else param_bytes  # dtype of matmul outputs
        self.targets, self.rank = (set(lora.targets), lora.rank) if lora else (set(), 0)
        self.kernels = kernels
        self.saved_ids: dict[int, _T] = {}  # a tensor saved by several ops counts once
        self.saved = 0  # bytes per token
        self.weight_copies = 0  # bytes of bf16 weight casts autocast keeps for backward

    def save(self, *tensors: _T) -> None:
        for t in tensors:
            if id(t) not in self.saved_ids:
                self.saved_ids[id(t)] = t
                self.saved += t.n * t.b

    @staticmethod
    def cast(x: _T, b: int) -> _T:
        return x if x.b == b else _T(x.n, b, x.rg)

    def linear(self, x: _T, n_in: int, n_out: int, name: str) -> _T:
        xin = self.cast(x, self.compute)  # autocast casts the input again for every Linear
        if self.full:  # grad of the weight needs the input
            self.save(xin)
        if self.amp and self.param_bytes != HALF and (self.full or x.rg):  # grad of x needs the (cast) weight
            self.weight_copies += HALF * n_in * n_out
        if name not in self.targets:
            return _T(n_out, self.compute, x.rg or self.full)
        adapter = HALF if self.amp else FP32  # adapters are fp32 parameters
        self.save(self.cast(x, adapter), _T(self.rank, adapter, True))  # inputs of lora_A and lora_B
        if self.amp:
            self.weight_copies += HALF * self.rank * (n_in + n_out)
        return _T(n_out, self.compute, True)

    def norm(self, x: _T, rows: int = 1, offset: float = 0.0, feeds_linear: bool = False) -> _T:
        """RMSNorm (normalized in fp32) or LayerNorm over the last dim; `rows` normalized rows per token.

        feeds_linear: under autocast the output is written in bf16, once for all the Linears reading it."""
        if self.mc.norm == "layernorm":
            out = _T(x.n, x.b, x.rg or self.full)
            if out.rg:
                self.save(x, _T(2 * rows, FP32, False))  # input, mean and rstd
            return out
        natural = x.b if offset else max(x.b, self.param_bytes)
        out = _T(x.n, HALF if feeds_linear and self.amp else natural, x.rg or self.full)
        if self.kernels.fused_norm_rope and out.b in (FP32, HALF) and out.rg:  # x and 1/rms; backward recomputes
            self.save(x, _T(rows, FP32, False))
            return out
        if x.rg:
            self.save(self.cast(x, FP32), _T(rows, FP32, False))  # x (fp32) and 1/rms(x)
        if self.full:  # weight * normalized: the weight's grad needs the normalized input
            self.save(_T(x.n, FP32 if offset else x.b, True))
        return out

    def attention(self, x: _T) -> _T:
        mc = self.mc
        q_dim, kv_dim = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        q = self.linear(x, mc.hidden_size, q_dim, "q_proj")
        k = self.linear(x, mc.hidden_size, kv_dim, "k_proj")
        v = self.linear(x, mc.hidden_size, kv_dim, "v_proj")
        if mc.qk_norm:
            q, k = self.norm(q, mc.num_heads), self.norm(k, mc.num_kv_heads)
        if mc.position == "rope":  # saves only the cos/sin tables; writes the autocast dtype (else the wider one)
            b = HALF if self.amp else max(q.b, self.param_bytes)
            q, k = _T(q.n, b, q.rg), _T(k.n, b, k.rg)
        b = HALF if self.amp else q.b  # kernels.attention casts q, k, v to the autocast dtype
        q, k, v = self.cast(q, b), self.cast(k, b), self.cast(v, b)
        rg = q.rg or k.rg or v.rg
        y = _T(q_dim, b, rg)
        if rg and self.kernels.probs_attention(b):  # q, k, a [B*nkv, T, hd] copy of v, the [T, T] probabilities
            self.save(q, k, _T(kv_dim, b, True), _T(mc.num_heads * self.T, b, True))
        elif rg:  # SDPA (flash / memory-efficient): q, k, v, output and logsumexp; no T x T matrix
            self.save(q, k, v, y, _T(mc.num_heads, FP32, False))
        # o_proj reads y as [B, T, nh * hd]: a view when y is laid out like that (SDPA follows q's layout,
        # and only the fused RoPE writes q as [B, nh, T, hd]); else a copy
        view = not self.kernels.probs_attention(b) and not (mc.position == "rope" and self.kernels.fused_norm_rope)
        return self.linear(y if view else _T(q_dim, b, rg), q_dim, mc.hidden_size, "o_proj")

    def mlp(self, x: _T) -> _T:
        C, F = self.mc.hidden_size, self.mc.intermediate_size
        relu = self.mc.activation == "relu"  # relu's backward reads its output, the others their input
        if not self.mc.gated_mlp:
            u = self.linear(x, C, F, "up_proj")
            s = _T(F, u.b, u.rg)
            if u.rg:
                self.save(s if relu else u)
            return self.linear(s, F, C, "down_proj")
        g = self.linear(x, C, F, "gate_proj")
        s = _T(F, g.b, g.rg)
        if g.rg:
            self.save(s if relu else g)
        u = self.linear(x, C, F, "up_proj")
        if u.rg:  # s * u: each factor is saved for the other's grad
            self.save(s)
        if s.rg:
            self.save(u)
        p = _T(F, max(s.b, u.b), s.rg or u.rg)
        return self.linear(p, F, C, "down_proj")

    def block(self, x: _T) -> _T:
        offset = self.mc.norm_weight_offset
        attn = self.attention(self.norm(x, offset=offset, feeds_linear=True))
        h = _T(x.n, max(x.b, attn.b), x.rg or attn.rg)  # the residual keeps the wider dtype
        mlp = self.mlp(self.norm(h, offset=offset, feeds_linear=True))
        return _T(h.n, max(h.b, mlp.b), h.rg or mlp.rg)


@dataclass(frozen=True)
class _Kernels:
    """Which kernels.* implementations a training step takes (kernels/__init__.py decides the same way)."""

    fused_norm_rope: bool  # CPU training with the compiled module: RMSNorm saves x and 1/rms only
    grouped_attention: bool  # CPU training (not ENGINE_KERNELS=torch): bf16 attention keeps its probabilities

    def probs_attention(self, b: int) -> bool:
        return self.grouped_attention and b == HALF

    @staticmethod
    def for_device(device: str) -> "_Kernels":
        import kernels

        info = kernels.info()
        cpu = device == "cpu"
        return _Kernels(fused_norm_rope=cpu and info["native"], grouped_attention=cpu and info["env"] != "torch")


@dataclass(frozen=True)
class _Activations:
    first_layer: int  # bytes per token saved by layer 0 (with LoRA its input needs no grad)
    layer: int  # bytes per token saved by each later layer
    final: int  # bytes per token saved outside the layers (final norm, token ids)
    layer_input: int  # bytes per token of a layer's input (all that activation checkpointing keeps)
    first_layer_weight_copies: int  # bytes of autocast bf16 weight copies kept by layer 0
    layer_weight_copies: int  # ... and by each later layer
    head_bytes: int  # dtype of the hidden states entering the LM-head loss


def _walk(mc: ModelConfig, seq_len: int, amp: bool, param_bytes: int, full: bool, lora,
          kernels: _Kernels) -> _Activations:
    walk = _BlockWalk(mc, seq_len, amp, param_bytes, full, lora, kernels)
    x0 = _T(mc.hidden_size, param_bytes, full)  # embedding output: needs grad only if the embedding trains
    x1 = walk.block(x0)
    first, first_copies = walk.saved, walk.weight_copies
    x2 = walk.block(x1)
    layer = walk.saved - first
    walk.norm(x2, offset=mc.norm_weight_offset)
    final = walk.saved - first - layer + (8 if full else 0)  # + int64 token ids for the embedding's grad
    return _Activations(first, layer, final, x1.b * x1.n, first_copies, walk.weight_copies - first_copies,
                        HALF if amp else x2.b)


# ---------------------------------------------------------------------------- parameters


def lora_params(mc: ModelConfig, lora: LoraConfig) -> int:
    """Trainable adapter parameters: rank * (in + out) per targeted Linear per layer (one A per fused module)."""
    C, F = mc.hidden_size, mc.intermediate_size
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    shapes = {"q_proj": (C, q), "k_proj": (C, kv), "v_proj": (C, kv), "o_proj": (q, C),
              "gate_proj": (C, F) if mc.gated_mlp else None, "up_proj": (C, F), "down_proj": (F, C)}
    per_layer = sum(lora.rank * sum(shapes[t]) for t in lora.targets if shapes[t])
    if mc.hf_model_type == "gpt2" and "q_proj" in lora.targets:
        per_layer -= 2 * lora.rank * C  # GPT-2's q, k, v share one A (engine.adapters.lora: fused c_attn)
    return mc.num_layers * per_layer


def _root_params(mc: ModelConfig) -> int:
    """Embedding and LM head (one matrix when tied): what is not in a Block."""
    return mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)


def _layer_params(mc: ModelConfig) -> int:
    return (mc.num_params - _root_params(mc)) // mc.num_layers  # final norm / learned positions: a rounding error


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _StepBytes:
    """What a step allocates besides weights and optimizer state, in bytes (see the module doc's phases)."""

    saved: int  # activations at forward end
    recomputed: int  # activation checkpointing: one layer's activations during its backward
    last_layer: int  # activations still alive when backward reaches layer 0
    copies_forward: int  # autocast bf16 weight copies at forward end ...
    copies_backward: int  # ... and at backward start
    head_bytes: int  # dtype of the hidden states entering the LM-head loss
    probs_attention: bool


def _step_activations(mc: ModelConfig, cfg: RunConfig, amp: bool, param_bytes: int, kernels: _Kernels) -> _StepBytes:
    full, t, L = cfg.lora is None, cfg.train, mc.num_layers
    B, T = t.batch_size, cfg.data.seq_len
    N = B * T
    probs_attention = kernels.probs_attention(HALF if amp else param_bytes)
    act = _walk(mc, T, amp, param_bytes, full, cfg.lora, kernels)
    # SFT rows carry a [B, 1, T, T] mask, sliding windows a [T, T] one; SDPA keeps a float copy per layer.
    window = mc.sliding_window is not None and T > mc.sliding_window
    mask = 0 if probs_attention else (B * T * T if cfg.data.format == "sft" else T * T if window else 0)
    mask *= HALF if amp else param_bytes
    # RoPE's cos/sin [B|1, T, hd] fp32 are shared by the layers, except that the fused kernel takes an
    # fp32 copy of bf16 tables (a bf16 base) in every layer.
    rope = 0
    if mc.position == "rope":
        rope = 2 * mc.head_dim * FP32 * (N if cfg.data.format == "sft" else T)
        rope *= L if kernels.fused_norm_rope and param_bytes != FP32 else 1
    copies = act.first_layer_weight_copies + (L - 1) * act.layer_weight_copies  # autocast's cache, until forward ends
    if t.activation_checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        recomputed = act.layer * N + mask
        return _StepBytes(saved=(L * act.layer_input + act.final) * N + rope, recomputed=recomputed,
                          last_layer=recomputed + act.layer_input * N, copies_forward=copies,
                          copies_backward=act.layer_weight_copies, head_bytes=act.head_bytes,
                          probs_attention=probs_attention)
    return _StepBytes(saved=(act.first_layer + (L - 1) * act.layer + act.final) * N + L * mask + rope, recomputed=0,
                      last_layer=act.first_layer * N + mask, copies_forward=copies, copies_backward=copies,
                      head_bytes=act.head_bytes, probs_attention=probs_attention)


def _lm_head(mc: ModelConfig, N: int, hb: int, trains: bool, casts_weight: bool, cpu: bool) -> tuple[int, int]:
    """(resident, forward) bytes of kernels.linear_cross_entropy on N tokens of hidden dtype `hb`: the hidden
    states and their grad [N, C]; chunks of logits [chunk, V] (CPU: one buffer kept across steps); when the
    head trains, its grad [V, C], computed during forward (one chunk: one GEMM in the hidden dtype; more:
    an fp32 accumulator, cast at the end); under autocast, a bf16 copy of the head weight."""
    V, C = mc.vocab_size, mc.hidden_size
    chunk = max(1, min(N, LOGITS_CHUNK_BYTES // (V * hb)))
    logits = chunk * V * hb
    forward = 2 * N * C * hb + (0 if cpu else logits * (2 if N > chunk else 1))  # CUDA: a new chunk per step
    if trains:
        forward += V * C * hb if chunk >= N else V * C * FP32 + (2 * V * C * hb if hb != FP32 else 0)
    forward += V * C * HALF if casts_weight else 0
    return (logits if cpu else 0), forward


def estimate_memory(mc: ModelConfig, cfg: RunConfig, world_size: int = 1, device: str = "cpu") -> MemoryPlan:
    """Bytes per rank to train `cfg` on a model of shape `mc` with `world_size` ranks (cfg.distributed.strategy)
    on `device` ("cpu" or "cuda")."""
    if world_size < 1:
        raise ConfigError(f"--nproc: expected an integer >= 1, got {world_size}")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    t, lora, full = cfg.train, cfg.lora, cfg.lora is None
    amp = t.precision != "fp32"
    param_bytes = HALF if lora is not None and lora.base_dtype == "bf16" else FP32
    P = mc.num_params
    trainable = P if full else lora_params(mc, lora)
    weights = P * FP32 if full else P * param_bytes + trainable * FP32
    grads, optimizer = trainable * FP32, 2 * trainable * FP32
    C, V, N = mc.hidden_size, mc.vocab_size, t.batch_size * cfg.data.seq_len
    strategy = "single process" if world_size == 1 else cfg.distributed.strategy
    step = _step_activations(mc, cfg, amp, param_bytes, _Kernels.for_device(device))
    # FSDP under autocast gathers the weights in bf16 itself (engine.distributed.wrap's MixedPrecisionPolicy),
    # so autocast makes no weight copies.
    gathers_half = strategy == "fsdp" and amp
    if gathers_half:
        step = dataclasses.replace(step, copies_forward=0, copies_backward=0)
    resident, head_forward = _lm_head(mc, N, step.head_bytes, full, amp and param_bytes != HALF and not gathers_half,
                                      device == "cpu")
    # Backward of the top layer: the head's fp32 grad and grad_hidden stay; that layer's weight grads and
    # the grads of its widest intermediates ([N, F] x 3, [N, C] x 2, attention probabilities x 2) come in.
    layer_grads = _layer_params(mc) * FP32 if full else trainable * FP32 // mc.num_layers
    probs = 2 * N * mc.num_heads * cfg.data.seq_len * HALF if step.probs_attention else 0
    transient = max(N * (3 * mc.intermediate_size * step.head_bytes + 2 * C * FP32), probs) + layer_grads
    head_backward = (V * C * FP32 if full else 0) + N * C * step.head_bytes + transient
    tied_embed_grad = V * C * FP32 if full and mc.tie_word_embeddings else 0  # added into the head's grad
    # Earlier micro-batches' grads stay during the next forward (FSDP's too, unsharded: no reduce-scatter
    # until the step's last micro-batch).
    accum_grads = grads if t.grad_accum > 1 else 0

    workspace = {"LM head + loss": head_forward + resident}
    if step.copies_forward:
        workspace["autocast bf16 weight copies"] = step.copies_forward
    workspace["backward temporaries"] = transient
    extra = resident
    if strategy == "ddp":  # DDP all-reduces through flat bucket copies of the grads, kept for the whole run
        workspace["DDP gradient buckets"] = grads
        extra += grads
    elif strategy == "fsdp":  # shards of everything, plus the gathered root (embeddings, head) and ~2 blocks
        weights, grads, optimizer = (-(-x // world_size) for x in (weights, grads, optimizer))
        workspace["FSDP gathered weights"] = (_root_params(mc) + 2 * _layer_params(mc)) * (HALF if gathers_half
                                                                                            else param_bytes)
        extra += workspace["FSDP gathered weights"]
        tied_embed_grad += V * C * FP32 if full else 0  # the root's grads are whole until reduce-scattered
    phases = {"forward end": step.saved + head_forward + step.copies_forward + accum_grads,
              "backward start": step.saved + step.recomputed + step.copies_backward + head_backward + accum_grads,
              "backward end": grads + max(step.last_layer + transient, tied_embed_grad)}
    phase = max(phases, key=phases.get)
    return MemoryPlan(weights=weights, grads=grads, optimizer=optimizer, activations=step.saved + step.recomputed,
                      workspace=workspace, peak=weights + optimizer + extra + phases[phase], peak_phase=phase,
                      total_params=P, trainable_params=trainable, world_size=world_size, strategy=strategy,
                      device=device)


def alternatives(mc: ModelConfig, cfg: RunConfig, world_size: int, device: str = "cpu") -> dict[str, MemoryPlan]:
    """Plans to compare with: "full" (no LoRA), "lora" (the run's, or the defaults; pretrained models only),
    "ddp" and "fsdp" at world_size."""
    out = {"full": estimate_memory(mc, dataclasses.replace(cfg, lora=None), world_size, device)}
    if cfg.model.from_pretrained is not None:
        out["lora"] = estimate_memory(mc, dataclasses.replace(cfg, lora=cfg.lora or LoraConfig()), world_size, device)
    for strategy in ("ddp", "fsdp"):
        run = dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, strategy=strategy))
        out[strategy] = estimate_memory(mc, run, world_size, device)
    return out


# ---------------------------------------------------------------------------- inputs and limits


def plan_model_config(cfg: RunConfig) -> ModelConfig:
    """The model's shape with its real vocab size, read without loading any weight (a hub id fetches config.json only)."""
    from engine.adapters.lora import check_lora_supported
    from engine.model.hf_format import read_config

    src = cfg.model
    if src.from_pretrained is not None:
        mc = read_config(_config_dir(src.from_pretrained))
    else:
        vocab = src.architecture.get("vocab_size")
        if vocab is None and src.tokenizer is not None:
            from engine.data.tokenizer import Tokenizer
            from engine.model.hf_format import resolve_model_dir

            vocab = len(Tokenizer.from_pretrained(resolve_model_dir(src.tokenizer)))
        arch = {**src.architecture, "vocab_size": vocab or src.bpe_vocab_size}
        mc = ModelConfig.from_dict(arch, where="model.architecture")
    if cfg.data.seq_len > mc.max_position_embeddings:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                          f"{mc.max_position_embeddings}")
    if cfg.lora is not None:
        check_lora_supported(mc, cfg.lora)
    return mc


def _config_dir(path_or_hub_id: str) -> Path:
    """A local model dir, or the hub cache dir holding just its config.json (never the weights)."""
    from engine.model.hf_format import WeightsError, resolve_model_dir

    path = Path(path_or_hub_id).expanduser()
    if path.is_dir() or path.exists() or str(path_or_hub_id).startswith((".", "/", "~")):
        return resolve_model_dir(path_or_hub_id)  # its errors name the path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(path_or_hub_id), "config.json", cache_dir=os.environ.get("HF_HUB_CACHE"),
                                    local_files_only=os.environ.get("HF_HUB_OFFLINE", "").upper() in
                                    ("1", "ON", "YES", "TRUE"))).parent
    except Exception as e:  # network, auth, not-found and offline-cache misses all end here
        raise WeightsError(f"'{path_or_hub_id}' is not a local directory and its config.json could not be "
                           f"fetched from the Hugging Face hub ({type(e).__name__}: {e})") from None


def plan_device(name: str) -> str:
    """"cpu" or "cuda" for a train.device value ("auto": cuda when this machine has it)."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def available_memory(device: str, world_size: int = 1) -> Optional[tuple[int, str]]:
    """(bytes, what was read): the least free VRAM of the GPUs `world_size` local ranks take, or MemAvailable
    RAM; None when this machine has no such device (planning for another one)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        gpus = range(max(1, min(world_size, torch.cuda.device_count())))
        return min(torch.cuda.mem_get_info(i)[0] for i in gpus), "free VRAM" + (" (least of the GPUs)" if len(gpus) > 1 else "")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM (MemAvailable)"
    except OSError:  # not Linux
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"
