"""kernels.AdamW: an AdamW whose step is one fused pass per element (kernels/csrc/adamw.cpp,
cuda/adamw.cu: _C.adamw_cpu/_cuda, _C.grad_sumsq_cpu/_cuda), with global-norm clipping folded in.

State layout is torch.optim.AdamW's (`step` float32 0-dim tensor, `exp_avg`, `exp_avg_sq`; the
same param_group keys), so state_dicts move between the two in both directions. Differences,
both deliberate: moments are always fp32, and a bf16/fp16 param also gets an fp32
`master_param` that the update is applied to (rounding every step to bf16 would lose small
updates). torch loads our state by casting it to the param dtype and ignores `master_param`;
loading torch's state here upcasts the moments and seeds the master from the param.

Sharded parameters (FSDP2's DTensors) are stepped through their local shards: the update is
elementwise, so each rank updates its own shard, and only the clipping norm needs the other ranks
(their shards' sums of squares are all-reduced). The moments are DTensors like the params, so
torch.distributed.checkpoint saves and reshards them.

kernels/__init__.py subclasses this to plug in the backend choice (_native_ext). The state is
checked against each param before every step (_state_for): a checkpoint whose moments don't
match its params is refused with a ValueError on both backends (the compiled entries check again).
"""
from __future__ import annotations

import math

import torch

from kernels import reference
from kernels.ops.common import device_problems

NAME = "kernels.AdamW"

_TORCH_GROUP_FLAGS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                          differentiable=False, fused=None, decoupled_weight_decay=True)


def problems(build, params: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[list[str], list[str]]:
    """Why the compiled step can't run these (local) params and grads."""
    out = []
    devices = {p.device for p in params}
    if len(devices) > 1:
        out.append(f"params span several devices {sorted(map(str, devices))}")
    for p, g in zip(params, grads):
        out += device_problems(build, "param", p)
        if not (p.is_contiguous() and g.is_contiguous()):
            out.append("params and grads must be contiguous")
    return out, []


class FusedAdamW(torch.optim.Optimizer):
    name = NAME

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 max_grad_norm=None, backend=None, skip_nonfinite=False):
        checks = [("lr", lr, lr >= 0), ("eps", eps, eps >= 0),
                  ("weight_decay", weight_decay, weight_decay >= 0),
                  ("betas", betas, len(betas) == 2 and all(0 <= b < 1 for b in betas)),
                  ("max_grad_norm", max_grad_norm, max_grad_norm is None or max_grad_norm > 0)]
        for arg, value, ok in checks:
            if not ok:
                raise ValueError(f"{self.name}: {arg} out of range, got {value!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        **_TORCH_GROUP_FLAGS)
        super().__init__(params, defaults)
        # Global across groups, so an optimizer attribute rather than a group key (that also
        # keeps param_groups identical to torch's).
        self.max_grad_norm = max_grad_norm
        self.backend = backend
        self.last_grad_norm: torch.Tensor | None = None  # pre-clip global norm of the last step
        # With clipping: a step whose global grad norm is inf/NaN changes nothing (weights, moments, step
        # counts), so callers need not compute the norm a second time to guard the update.
        self.skip_nonfinite = skip_nonfinite
        self.last_step_skipped = False

    # torch.optim.Optimizer wraps add_param_group and zero_grad in torch._disable_dynamo, whose first
    # call imports torch._dynamo (and sympy): ~70 MB of resident memory in every training process
    # that never compiles anything (measured: bench/bench_moe.py's peak RSS). These call the same
    # torch code without that wrapper; __wrapped__ is functools.wraps' link to it (the wrapped
    # method itself when a torch version has none).
    def add_param_group(self, param_group) -> None:
        method = torch.optim.Optimizer.add_param_group
        getattr(method, "__wrapped__", method)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        method = torch.optim.Optimizer.zero_grad
        getattr(method, "__wrapped__", method)(self, set_to_none)

    def _native_ext(self, params: list[torch.Tensor], grads: list[torch.Tensor]):
        """The compiled module if it should run these (local) params and grads, else None (fallback)."""
        raise NotImplementedError

    def _state_for(self, index: int, p: torch.Tensor) -> dict:
        """The state of param `index` (its position in the optimizer), created on its first step;
        torch's layout converted to ours (fp32 moments, `step` on the param's device); and
        checked: moments of another shape (a checkpoint of another model) raise ValueError."""
        state = self.state[p]
        math_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=math_dtype, memory_format=torch.contiguous_format)
        step = state.get("step")
        if not (isinstance(step, torch.Tensor) and step.numel() == 1 and step.is_floating_point()):
            raise ValueError(f"{self.name}: state of param {index} {list(p.shape)}: step must be one "
                             f"floating-point tensor, got {_desc(step)}")
        if step.device != p.device or step.dtype != torch.float32:  # torch keeps `step` on CPU for unfused AdamW
            state["step"] = step.to(p.device, torch.float32).reshape(())
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            t = state.get(key)
            if t is None and key == "master_param":
                continue
            if not (isinstance(t, torch.Tensor) and t.shape == p.shape):
                raise ValueError(f"{self.name}: state of param {index}: {key} must have the param's "
                                 f"shape {list(p.shape)}, got {_desc(t)} (a checkpoint of another model?)")
            dtype = torch.float32 if key == "master_param" else math_dtype
            if t.dtype != dtype or t.device != p.device or not _local(t).is_contiguous():
                # torch's bf16 moments, or a state moved by hand: ours are fp32, dense, beside the param
                state[key] = t.to(p.device, dtype).contiguous()
        if math_dtype != p.dtype and "master_param" not in state:
            state["master_param"] = p.detach().float().contiguous()
        return state

    def _check_group(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        for flag in ("amsgrad", "maximize", "differentiable"):
            if group.get(flag):
                raise ValueError(f"{self.name}: param_group {flag}=True is not supported")
        for p, g in zip(params, grads):
            if g.is_sparse:
                raise ValueError(f"{self.name}: sparse gradients are not supported")
            if not p.is_floating_point() or g.dtype != p.dtype:
                raise ValueError(f"{self.name}: params and grads must share a floating dtype, "
                                 f"got param {p.dtype} grad {g.dtype}")

    def _clip(self, params: list[torch.Tensor], grads: list[torch.Tensor]):
        """Global pre-clip norm (0-dim fp32 tensor) and the clip coefficient (float or tensor)."""
        ext = self._native_ext(params, grads) if params else None
        if ext is not None and params[0].device.type == "cpu":
            sumsq = ext.grad_sumsq_cpu(grads, n_threads=torch.get_num_threads())
            norm = math.sqrt(sumsq)
            return torch.tensor(norm, dtype=torch.float32), min(1.0, self.max_grad_norm / (norm + 1e-6))
        if ext is not None:  # CUDA: stays on device, no sync
            sumsq = torch.zeros(1, dtype=torch.float32, device=params[0].device)
            ext.grad_sumsq_cuda(grads, sumsq, stream=torch.cuda.current_stream(sumsq.device).cuda_stream)
            norm = sumsq.sqrt().squeeze(0)
            return norm, reference.clip_coefficient(norm, self.max_grad_norm)
        norm = reference.grad_norm(grads)
        return norm, reference.clip_coefficient(norm, self.max_grad_norm)

    def _clip_sharded(self, grads: list[torch.Tensor], sharded: list[bool], group):
        """_clip when some grads are this rank's shards of DTensors (FSDP): the shards' sums of squares
        are all-reduced over their process `group`; plain (replicated) grads count once."""
        shard_sq = (reference.grad_norm([g for g, s in zip(grads, sharded) if s]).reshape(1) ** 2).to(grads[0].device)
        torch.distributed.all_reduce(shard_sq, group=group)
        plain_sq = reference.grad_norm([g for g, s in zip(grads, sharded) if not s]) ** 2
        norm = (shard_sq.squeeze(0) + plain_sq.to(shard_sq.device)).sqrt()
        return norm, reference.clip_coefficient(norm, self.max_grad_norm)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over all params with a grad. Returns the closure's loss if given,
        else the pre-clip global grad norm (also in .last_grad_norm; None without clipping)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups, sharded, mesh_group = [], [], None
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            params, grads = [_local(p) for p in with_grad], [_local(p.grad) for p in with_grad]
            self._check_group(group, params, grads)
            states = [{k: _local(v) for k, v in self._state_for(self._index[p], p).items()} for p in with_grad]
            groups.append((group, params, grads, states))
            for p in with_grad:
                sharded.append(_is_dtensor(p))
                if sharded[-1] and mesh_group is None:
                    mesh_group = p.device_mesh.get_group()
        clip = 1.0
        if self.max_grad_norm is not None:
            params = [p for _, ps, _, _ in groups for p in ps]
            grads = [g for _, _, gs, _ in groups for g in gs]
            self.last_grad_norm, clip = (self._clip_sharded(grads, sharded, mesh_group) if any(sharded)
                                         else self._clip(params, grads))
        self.last_step_skipped = (self.skip_nonfinite and self.last_grad_norm is not None
                                  and not math.isfinite(float(self.last_grad_norm)))
        if self.last_step_skipped:
            return loss if closure is not None else self.last_grad_norm
        for group, params, grads, states in groups:
            if params:
                self._step_group(group, params, grads, states, clip)
        return loss if closure is not None else self.last_grad_norm

    def _step_group(self, group, params, grads, states, clip) -> None:
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        beta1, beta2 = group["betas"]
        hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"])
        masters = [s.get("master_param") for s in states]
        ext = self._native_ext(params, grads)
        if ext is None:
            reference.adamw_step_(params, grads, [s["exp_avg"] for s in states],
                                  [s["exp_avg_sq"] for s in states], masters, steps,
                                  clip_coef=clip, **hyper)
            return
        on_cuda = params[0].device.type == "cuda"
        clip_sumsq = None
        if on_cuda and isinstance(clip, torch.Tensor):
            clip_sumsq = (self.last_grad_norm.float() ** 2).reshape(1).contiguous()
        fn = ext.adamw_cuda if on_cuda else ext.adamw_cpu
        fn(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], masters, steps,
           **hyper, clip_coef=float(clip) if not on_cuda else 1.0, clip_sumsq=clip_sumsq,
           max_grad_norm=float(self.max_grad_norm or 0.0), n_threads=torch.get_num_threads(),
           stream=torch.cuda.current_stream(params[0].device).cuda_stream if on_cuda else 0)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch's or our state. torch's loader casts saved tensors to the param dtype,
        which would round our fp32 moments/master of bf16 params; restore them afterwards."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved and p.dtype in (torch.bfloat16, torch.float16):
                for key in ("exp_avg", "exp_avg_sq", "master_param"):
                    if key in saved[i]:
                        self.state[p][key] = saved[i][key].to(p.device, torch.float32, copy=True)


def _desc(x) -> str:
    return f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"  # without importing torch.distributed.tensor for plain runs


def _local(t):
    """A DTensor's local shard (sharing its memory), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t
