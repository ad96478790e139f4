"""LoRA: low-rank adapters that wrap frozen linear layers; switched off and on without copying the base.

y = base_layer(x) + scale * B (A dropout(x)),   A [r, in] (kaiming-uniform), B [out, r] (zeros), scale = alpha / r.

`apply_lora` swaps each targeted linear child of a Transformer for a `LoRALinear` that keeps the original
layer as its `base_layer` submodule (as PEFT's LoraLayer does) and calls it, so the base matmul is the
model's own (`engine.model.transformer.Linear`: kernels.linear) and could later be a quantized layer. The
base's parameters are therefore named `...q_proj.base_layer.weight` while adapted; nothing reads them by
name then (a LoRA run saves and loads the adapters only, engine.adapters.peft_format), and `merge_lora`
puts the base layers back, so HF names and files are unchanged. Every non-adapter parameter is frozen.

Everything about a model's adapters (config, base dtype, adapted layers) is one `LoraState`, reached with
`adapter_state(model)`; `adapters_disabled(model)` makes the model its base model again (DPO's reference)
for the length of a `with` block, bit for bit.

GPT-2 keeps q, k and v in one Conv1D (`c_attn`), and PEFT adapts that module as a whole: one A [r, in] and one
B [3 * out, r]. Here q_proj, k_proj and v_proj share one lora_A module and each holds its rows of B, which is
the same function and the same gradients; on disk B is their concatenation. (With dropout > 0 the three draw
separate dropout masks where PEFT draws one: the same in expectation, not bit for bit.)
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from engine.config import LORA_TARGETS, ConfigError, LoraConfig
from engine.model.families import stored_as, weight_layout
from engine.quant import QuantLinear

logger = logging.getLogger(__name__)
PEFT_PREFIX = "base_model.model."
STATE_ATTR = "lora_state"  # the one attribute apply_lora sets on a model (read it with adapter_state)


class LoRALinear(nn.Module):
    """A frozen `base_layer` (any module mapping [..., in] -> [..., out]) plus scale * B @ A, fp32 adapters."""

    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base.requires_grad_(False)
        self.scale = scale
        self.disabled = False  # set by LoraState.disabled(): forward is then exactly base_layer(x)
        device = next(itertools.chain(base.parameters(), base.buffers())).device  # a QuantLinear: buffers only
        # Adapters are fp32 master weights whatever the base dtype; initialized as PEFT does (B = 0: a no-op at start).
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = self.base_layer(x)
        if self.disabled:
            return y
        a = self.lora_A.weight
        if not torch.is_autocast_enabled(x.device.type) and y.dtype != a.dtype:  # bf16 base, no autocast: fp32 adapters
            return y + (self.lora_B(self.lora_A(self.dropout(x.to(a.dtype)))) * self.scale).to(y.dtype)
        return _add_scaled_lora_b(y, self.lora_A(self.dropout(x)), self.lora_B.weight, self.scale)

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B @ A in fp32 [out, in]; a quantized base is dequantized to fp32 first."""
        base = self.base_layer
        w = base.dequantize(torch.float32) if isinstance(base, QuantLinear) else base.weight.float()
        return w + self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"r={self.lora_A.out_features}, scale={self.scale:g}" + (", disabled" if self.disabled else "")


def _add_scaled_lora_b(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """y + scale * h @ B.T as one GEMM that accumulates into y (addmm): the separate `* scale` and `+ y` passes
    over the [N, out] output (and their backward) cost as much as the rank-r matmuls. y [..., out], h [..., r]."""
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
    return out.view(y.shape)


@dataclass
class LoraState:
    """A model's adapters: how they were made, and the layers that carry them (native name -> LoRALinear)."""

    config: LoraConfig
    base_name: str  # adapter_config.json's base_model_name_or_path ("" when unknown)
    base_dtype: torch.dtype
    modules: dict[str, LoRALinear] = field(repr=False)

    @contextlib.contextmanager
    def disabled(self):
        """Inside the block every adapted layer returns base_layer(x): the base model's exact outputs, with or
        without autograd; the previous setting comes back on exit (blocks nest)."""
        before = {name: m.disabled for name, m in self.modules.items()}
        for m in self.modules.values():
            m.disabled = True
        try:
            yield self
        finally:
            for name, m in self.modules.items():
                m.disabled = before[name]


def adapter_state(model) -> LoraState | None:
    """The model's LoraState, or None for a model without adapters."""
    return getattr(model, STATE_ATTR, None)


def is_lora(model) -> bool:
    """True while the model carries LoRA adapters (between apply_lora and merge_lora)."""
    return adapter_state(model) is not None


def lora_modules(model) -> dict[str, LoRALinear]:
    """Native module name (`layers.0.attn.q_proj`) -> LoRALinear, in model order."""
    state = adapter_state(model)
    return dict(state.modules) if state is not None else {}


def adapters_disabled(model):
    """`with adapters_disabled(model):` runs the base model alone (see LoraState.disabled)."""
    state = adapter_state(model)
    if state is None:
        raise ValueError("adapters_disabled: the model has no LoRA adapters (apply_lora first)")
    return state.disabled()


def check_lora_supported(model_cfg, lora: LoraConfig) -> None:
    """Targets the model can adapt: GPT-2's fused c_attn (q, k, v) is adapted whole or not at all."""
    fused = {"q_proj", "k_proj", "v_proj"}
    if model_cfg.hf_model_type == "gpt2" and 0 < len(fused & set(lora.targets)) < 3:
        raise ConfigError("lora.targets: GPT-2 stores q_proj, k_proj and v_proj in one module (c_attn), which an "
                          "adapter covers whole: target all three or none")
    for stored, parts in _fused_modules(model_cfg).items():  # Phi-3's qkv_proj, gate_up_proj: whole or not at all
        if 0 < len(parts & set(lora.targets)) < len(parts):
            raise ConfigError(f"lora.targets: this model stores {', '.join(sorted(parts))} in one module ({stored}), "
                              f"which an adapter covers whole: target all of them or none")
    if "gate_proj" in lora.targets and not model_cfg.gated_mlp and tuple(lora.targets) != LORA_TARGETS:
        raise ConfigError("lora.targets: 'gate_proj' is not in this model (its MLP is not gated)")
    # Mixture of experts: the experts are stacked [E, ...] parameters, not Linears (PEFT adapts them only through
    # target_parameters, not supported here); "all-linear" adapts the dense and shared-expert MLPs it finds.
    mlp = [t for t in ("gate_proj", "up_proj", "down_proj") if t in lora.targets]
    moe_layers = sum(map(model_cfg.is_moe_layer, range(model_cfg.num_layers)))
    if mlp and moe_layers and tuple(lora.targets) != LORA_TARGETS:
        raise ConfigError(f"lora.targets: {mlp[0]!r} would leave the experts of this mixture-of-experts model's "
                          f"{moe_layers} MoE layers unadapted (they are stacked parameters, which LoRA here does not "
                          "adapt); target the attention projections (q_proj, k_proj, v_proj, o_proj), or "
                          "'all-linear' to adapt them plus the dense and shared-expert MLPs")
    if mlp and moe_layers:
        logger.warning("lora.targets all-linear: the experts of %d mixture-of-experts layers stay frozen (stacked "
                       "parameters); the dense and shared-expert MLPs are adapted", moe_layers)


def _fused_modules(model_cfg) -> dict[str, set]:
    """Stored module name -> the native module names fused into it (from the family's weight table)."""
    out = {}
    for native, spec in weight_layout(model_cfg).table.items():
        if getattr(spec, "parts", 1) > 1 and native.endswith(".weight"):
            out.setdefault(spec.name.rsplit(".", 2)[-2], set()).add(native.rsplit(".", 2)[-2])
    return out


def apply_lora(model, lora: LoraConfig, base_name: str = "") -> list[str]:
    """Freeze `model` and wrap its target linears with LoRALinear, in place; return the wrapped module names.

    The base may be in any dtype (`lora.base_dtype`); adapters are fp32. `base_name` goes to adapter_config.json.
    """
    if is_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora first)")
    check_lora_supported(model.config, lora)
    base_dtype = next(model.parameters()).dtype
    for p in model.parameters():
        p.requires_grad_(False)
    modules = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in lora.targets and isinstance(child, (nn.Linear, QuantLinear)):
                full = f"{name}.{child_name}" if name else child_name
                modules[full] = LoRALinear(child, lora.rank, lora.scale, lora.dropout)
                setattr(module, child_name, modules[full])
    if not modules:
        raise ConfigError(f"lora.targets: none of {list(lora.targets)} is a linear layer of this model")
    for names in _fused_groups(model.config, modules).values():  # GPT-2's c_attn: one A for all its parts
        for name in names[1:]:
            modules[name].lora_A = modules[names[0]].lora_A
    setattr(model, STATE_ATTR, LoraState(lora, str(base_name), base_dtype, modules))
    return list(modules)


def merge_lora(model, dtype=None):
    """Fold every adapter into its base weight (in the base dtype) and put the base layers back; returns model.

    A quantized base (engine.quant) is dequantized to `dtype` first and the merged weight stays dense in `dtype`:
    re-quantizing W + BA would throw the adapter's small update away again (peft#2321). Without `dtype` that is
    an in-place merge into a quantized base: a ValueError."""
    modules = lora_modules(model)
    quantized = [name for name, m in modules.items() if isinstance(m.base_layer, QuantLinear)]
    if quantized and dtype is None:
        raise ValueError(f"merge_lora: {quantized[0]} has a {modules[quantized[0]].base_layer.kind}-quantized base; "
                         "merging into it in place would re-quantize the merged weight (peft#2321): pass dtype= "
                         "(e.g. torch.bfloat16) to dequantize the base to, then merge")
    with torch.no_grad():
        for name, m in modules.items():
            base = m.base_layer
            if isinstance(base, QuantLinear):
                base = base.to_linear(dtype)
            base.weight = nn.Parameter(m.merged_weight().to(base.weight.dtype), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, base)
    if is_lora(model):
        delattr(model, STATE_ATTR)
    return model


def peft_modules(model) -> dict[str, list[str]]:
    """PEFT module name -> the native LoRA modules stored in it, in storage order: one each, except a fused
    module (`base_model.model.transformer.h.0.attn.c_attn` -> layers.0.attn.{q,k,v}_proj)."""
    return _fused_groups(model.config, lora_modules(model))


def _fused_groups(model_cfg, modules) -> dict[str, list[str]]:
    layout, groups = weight_layout(model_cfg), {}
    for name in modules:
        stored = stored_as(layout, name + ".weight")
        groups.setdefault(PEFT_PREFIX + stored.name.removesuffix(".weight"), []).append((stored.part, name))
    return {peft: [name for _, name in sorted(parts)] for peft, parts in groups.items()}


def trainable_summary(model) -> str:
    """'0.12M trainable of 3.40M params (3.53%)'."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable / 1e6:.2f}M trainable of {total / 1e6:.2f}M params ({100 * trainable / total:.2f}%)"
