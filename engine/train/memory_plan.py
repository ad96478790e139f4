"""Memory planner: the bytes one rank needs to train a RunConfig, from the shapes alone (nothing is allocated).

B = batch_size, T = seq_len, N = B * T tokens per micro-batch, C = hidden_size, F = intermediate_size,
V = vocab_size, L = num_layers. Per rank:

    peak = weights + optimizer state + what else is alive at the worst moment of a step:
      forward end     saved activations + LM-head/loss workspace + autocast bf16 weight copies
      backward start  saved activations + the head's gradient + the top layer's backward temporaries
      backward end    every gradient + the first layer's activations (the others are freed by then)

Gradients appear while activations are freed, so the peak is below the sum of the rows. Activations
are counted by walking the model's own blocks, layer by layer (engine/train/activation_bytes.py: the
ops are Block.walk's, the kernel paths are asked of kernels); the fused LM-head loss holds one chunk of
logits (kernels' chunk size; kept across steps on CPU) and computes the head's gradient during forward.
tests/train/test_memory_plan.py holds the estimate to the measured peak of real steps.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.config import ConfigError, LoraConfig, ModelConfig, RunConfig
from engine.quant.layers import LOSS_CHUNK_BYTES
from engine.train.activation_bytes import FP32, HALF, KernelPaths, logits_chunk_rows, walk_layers


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


# Bytes per weight of a quantized block linear (engine.quant): NF4 codes + its uint8 absmax per 64 + an fp32
# scale per 256 absmaxes; int8 + an fp32 scale per output row (counted as 0).
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}


def _base_bytes(mc: ModelConfig, lora: LoraConfig) -> int:
    """Resident bytes of a frozen LoRA base: all fp32 or bf16, or (nf4 / int8) the block linears quantized and
    the embedding, norms and head in bf16."""
    if lora.base_dtype not in QUANT_BYTES:
        return mc.num_params * (HALF if lora.base_dtype == "bf16" else FP32)
    linears = _layer_params(mc) * mc.num_layers  # the norms in it are a rounding error
    return int(linears * QUANT_BYTES[lora.base_dtype]) + (mc.num_params - linears) * HALF


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


def _step_activations(mc: ModelConfig, cfg: RunConfig, amp: bool, param_bytes: int, kernels: KernelPaths) -> _StepBytes:
    full, t, specs = cfg.lora is None, cfg.train, mc.layer_specs()
    B, T = t.batch_size, cfg.data.seq_len
    N = B * T
    probs_attention = kernels.fused("attention", HALF if amp else param_bytes, T)
    act = walk_layers(mc, T, amp, param_bytes, full, cfg.lora, kernels)
    # SFT rows carry a [B, 1, T, T] mask, windowed layers a [T, T] one; SDPA keeps a float copy per layer.
    sft = cfg.data.format in ("sft", "preference")  # DPO's shared-prefix rows are masked like packed SFT rows
    masks = [0 if probs_attention else B * T * T if sft else T * T if s.window is not None and T > s.window else 0
             for s in specs]
    masks = [m * (HALF if amp else param_bytes) for m in masks]
    # RoPE's cos/sin [B|1, T, hd] fp32 are shared by the layers with the same RoPE, except that the fused
    # kernel takes an fp32 copy of bf16 tables (a bf16 base) in every layer.
    table = 2 * mc.head_dim * FP32 * (N if sft else T)
    with_rope = [s.rope for s in specs if s.rope is not None]
    copied = kernels.fused("rope", HALF if amp else param_bytes) and param_bytes != FP32
    rope = table * (len(with_rope) if copied else len(set(with_rope)))
    copies = sum(act.weight_copies)  # autocast's cache, until forward ends
    if t.activation_checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        recomputed = max(act.layers[1:] or act.layers) * N + max(masks)
        return _StepBytes(saved=(act.layer_inputs + act.final) * N + rope, recomputed=recomputed,
                          last_layer=recomputed + act.layer_inputs // len(specs) * N, copies_forward=copies,
                          copies_backward=act.weight_copies[-1], head_bytes=act.head_bytes,
                          probs_attention=probs_attention)
    return _StepBytes(saved=(sum(act.layers) + act.final) * N + sum(masks) + rope, recomputed=0,
                      last_layer=act.layers[0] * N + masks[0], copies_forward=copies, copies_backward=copies,
                      head_bytes=act.head_bytes, probs_attention=probs_attention)


def _lm_head(mc: ModelConfig, N: int, hb: int, trains: bool, casts_weight: bool, cpu: bool,
             quantized: bool = False) -> tuple[int, int]:
    """(resident, forward) bytes of kernels.linear_cross_entropy on N tokens of hidden dtype `hb`: the hidden
    states and their grad [N, C]; chunks of logits [chunk, V] (CPU: one buffer, kept across steps unless the
    base is quantized, whose loss frees it); when the head trains, its grad [V, C], computed during forward
    (one chunk: one GEMM in the hidden dtype; more: an fp32 accumulator, cast at the end); under autocast, a
    bf16 copy of the head weight."""
    V, C = mc.vocab_size, mc.hidden_size
    chunk = logits_chunk_rows(N, V, hb)
    if quantized:  # a quantized base runs smaller chunks (engine.quant.loss_chunk_rows)
        chunk = max(1, min(N, LOSS_CHUNK_BYTES // (V * hb)))
    logits = chunk * V * hb
    kept = cpu and not quantized  # a quantized base frees the buffer after the loss (engine.train.objectives)
    # CUDA: a new chunk per step (two alive across chunks); CPU: one buffer
    forward = 2 * N * C * hb + (0 if kept else logits * (2 if N > chunk and not cpu else 1))
    if trains:
        forward += V * C * hb if chunk >= N else V * C * FP32 + (2 * V * C * hb if hb != FP32 else 0)
    forward += V * C * HALF if casts_weight else 0
    return (logits if kept else 0), forward


@dataclass(frozen=True)
class _MethodTerms:
    """How a preference or RL objective changes a step's memory (see _method_terms)."""

    token_cfg: RunConfig  # the run as the token rows its training forward sees
    ref_weights: int = 0  # a frozen reference copy (full fine-tuning)
    ref_forward_per_token: int = 0  # elements per token alive in a no-grad reference (or old-policy) forward
    sampling: int = 0  # GRPO: the rollout KV cache and one step's logits


def _method_terms(mc: ModelConfig, cfg: RunConfig) -> _MethodTerms:
    """DPO: B pairs are B rows of up to 2T tokens (engine.train.dpo_packing: prompt once, both completions, as
    masked as packed SFT rows; 2T is the worst case, no shared prefix); the reference is the LoRA base with
    adapters disabled (no weights; a no-grad forward after the policy's, while the policy's activations are
    saved), a frozen copy (full fine-tuning: its weights), or nothing (precompute_ref, simpo/orpo).
    GRPO: B prompts are B*G rows of T + max_completion_length; sampling, before the step's forward, holds a KV
    cache of those rows (model dtype) and [B*G, V] fp32 logits, then old-policy / reference log-probs take no-grad
    forwards (beta > 0 with full fine-tuning adds a frozen fp32 copy)."""
    t, T = cfg.train, cfg.data.seq_len
    objective = t.objective
    if objective not in ("dpo", "grpo"):
        return _MethodTerms(cfg)
    no_grad = 3 * mc.intermediate_size + 3 * mc.hidden_size  # one layer's widest live intermediates + its output
    if objective == "dpo":
        dpo = cfg.dpo or _default("dpo")
        token_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=2 * T))
        on_the_fly = dpo.needs_reference and not dpo.precompute_ref
        copy = mc.num_params * (HALF if dpo.ref_dtype == "bf16" else FP32) if on_the_fly and cfg.lora is None else 0
        return _MethodTerms(token_cfg, ref_weights=copy, ref_forward_per_token=no_grad if on_the_fly else 0)
    grpo = cfg.grpo or _default("grpo")
    G, total = grpo.num_generations, T + grpo.max_completion_length
    token_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, batch_size=t.batch_size * G),
                                    data=dataclasses.replace(cfg.data, seq_len=total))
    rows = t.batch_size * G
    model_bytes = HALF if cfg.lora is not None and cfg.lora.base_dtype != "fp32" else FP32
    kv = 2 * mc.num_layers * rows * total * mc.num_kv_heads * mc.head_dim * model_bytes
    copy = mc.num_params * FP32 if grpo.beta != 0.0 and cfg.lora is None else 0
    extra_pass = grpo.beta != 0.0 or grpo.num_iterations > 1  # in the sampling phase too (before the forward)
    scoring = rows * total * no_grad * model_bytes if extra_pass else 0
    return _MethodTerms(token_cfg, ref_weights=copy, sampling=max(kv + rows * mc.vocab_size * FP32, scoring))


def _default(section: str):
    from engine.config import DPOConfig, GRPOConfig

    return DPOConfig() if section == "dpo" else GRPOConfig()


def estimate_memory(mc: ModelConfig, cfg: RunConfig, world_size: int = 1, device: str = "cpu") -> MemoryPlan:
    """Bytes per rank to train `cfg` on a model of shape `mc` with `world_size` ranks (cfg.distributed.strategy)
    on `device` ("cpu" or "cuda")."""
    if world_size < 1:
        raise ConfigError(f"--nproc: expected an integer >= 1, got {world_size}")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    method = _method_terms(mc, cfg)
    cfg = method.token_cfg
    t, lora, full = cfg.train, cfg.lora, cfg.lora is None
    amp = t.precision != "fp32"
    # A quantized base computes in bf16 from tiles of dequantized weights: like a bf16 base, no autocast copies.
    param_bytes = HALF if lora is not None and lora.base_dtype != "fp32" else FP32
    P = mc.num_params
    trainable = P if full else lora_params(mc, lora)
    weights = (P * FP32 if full else _base_bytes(mc, lora) + trainable * FP32) + method.ref_weights
    grads, optimizer = trainable * FP32, 2 * trainable * FP32
    C, V, N = mc.hidden_size, mc.vocab_size, t.batch_size * cfg.data.seq_len
    strategy = "single process" if world_size == 1 else cfg.distributed.strategy
    step = _step_activations(mc, cfg, amp, param_bytes, KernelPaths(device))
    # FSDP under autocast gathers the weights in bf16 itself (engine.distributed.wrap's MixedPrecisionPolicy),
    # so autocast makes no weight copies.
    gathers_half = strategy == "fsdp" and amp
    if gathers_half:
        step = dataclasses.replace(step, copies_forward=0, copies_backward=0)
    resident, head_forward = _lm_head(mc, N, step.head_bytes, full, amp and param_bytes != HALF and not gathers_half,
                                      device == "cpu", lora is not None and lora.base_dtype in QUANT_BYTES)
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
    ref_forward = method.ref_forward_per_token * N * step.head_bytes if method.ref_forward_per_token else 0
    if ref_forward:
        workspace["reference forward (no grad)"] = ref_forward
    if method.sampling:
        workspace["GRPO sampling (KV cache + logits)"] = method.sampling
    if lora is not None and lora.base_dtype in QUANT_BYTES:  # one tile at a time (kernels.quant_linear)
        from kernels.ops.quant_linear import TILE_ELEMS

        largest = C * max(mc.intermediate_size, mc.num_heads * mc.head_dim)  # the widest block linear
        workspace["dequantized weight tile"] = min(TILE_ELEMS, largest) * HALF
        transient += workspace["dequantized weight tile"]
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
    phases = {"forward end": step.saved + head_forward + step.copies_forward + accum_grads + ref_forward,
              "backward start": step.saved + step.recomputed + step.copies_backward + head_backward + accum_grads,
              "backward end": grads + max(step.last_layer + transient, tied_embed_grad)}
    if method.sampling:  # before the step's forward: only weights and optimizer state are alive with it
        phases["sampling"] = method.sampling
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
    """The model's shape with its real vocab size, read without loading any weight."""
    from engine.adapters.lora import check_lora_supported
    from engine.model.hf_format import CONFIG_FILES, TOKENIZER_FILES, read_config, resolve_model_dir

    src = cfg.model
    if src.from_pretrained is not None:  # a hub id fetches config.json only, never the weights
        mc = read_config(resolve_model_dir(src.from_pretrained, allow_patterns=CONFIG_FILES))
    else:
        vocab = src.architecture.get("vocab_size")
        if vocab is None and src.tokenizer is not None:
            from engine.data.tokenizer import Tokenizer

            vocab = len(Tokenizer.from_pretrained(resolve_model_dir(src.tokenizer, allow_patterns=TOKENIZER_FILES)))
        arch = {**src.architecture, "vocab_size": vocab or src.bpe_vocab_size}
        mc = ModelConfig.from_dict(arch, where="model.architecture")
    if cfg.data.seq_len > mc.max_position_embeddings:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                          f"{mc.max_position_embeddings}")
    if cfg.lora is not None:
        check_lora_supported(mc, cfg.lora)
    return mc


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
