"""One config on N processes: `torchrun --nproc_per_node=N -m cli.train config.json`.

PyTorch does the distributed work (torch.distributed, DDP, FSDP2's `fully_shard`); this file only sets it
up. torchrun exports RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous address; without them (or with
WORLD_SIZE=1) every helper here is a no-op and training runs in one process as usual.

How N ranks stay equivalent to one process (tests/train/test_distributed.py checks it):
  - a step's windows are split by (micro-batch, rank), so N ranks with grad_accum k read exactly the
    windows one process with grad_accum N*k reads (engine.data.TokenWindows.batch);
  - each rank's summed loss is divided by the target tokens of the *whole* step (summed over ranks), and
    multiplied by N because DDP and FSDP average gradients over ranks: the average of N such gradients
    is the gradient of the global token-mean loss;
  - gradients are only synchronized on a step's last micro-batch (DDP's no_sync, FSDP's
    set_requires_gradient_sync(False)).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.config import ConfigError, RunConfig

logger = logging.getLogger("engine.train.distributed")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. The default is a single process (rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # "none" (one process), "ddp" or "fsdp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes metrics and files that exist once (configs, HF exports)."""
        return self.rank == 0

    def sum(self, value: float) -> float:
        """`value` summed over ranks (every rank gets the total)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable value)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn):
        """fn() on rank 0, then on the other ranks, which reuse what it wrote (the BPE, the tokenized data).

        An exception on rank 0 stops every rank: rank 0 raises it, the others raise RankZeroFailed with
        it (the CLIs exit with rank 0's exit code and let rank 0 print the one error line), instead of
        failing later with "connection closed" in their next collective."""
        if not self.enabled:
            return fn()
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:
                self.broadcast(exc if _picklable(exc) else RuntimeError(f"rank 0: {exc}"))
                raise
            self.broadcast(None)
            return result
        error = self.broadcast(None)
        if error is not None:
            raise RankZeroFailed(error)
        return fn()


class RankZeroFailed(Exception):
    """Raised on ranks > 0 when rank 0 failed in `Dist.main_first`; `error` is rank 0's exception."""

    def __init__(self, error: BaseException):
        super().__init__(f"rank 0 failed: {error}")
        self.error = error


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:
        return False


SINGLE = Dist()


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun exports them; (0, 1, 0) outside torchrun."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as exc:
        raise ConfigError(f"distributed: RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from None


def init_distributed(cfg: RunConfig, device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1; return this rank's Dist and its device.

    Backend: `distributed.backend`, else nccl on CUDA and gloo on CPU. On CUDA each rank takes the GPU
    of its LOCAL_RANK.
    """
    rank, world_size, local_rank = world_from_env()
    if world_size <= 1:
        if cfg.distributed.strategy == "fsdp":
            logger.warning("distributed.strategy: 'fsdp' has no effect in one process (nothing to shard); "
                           "run under torchrun --nproc_per_node=N to shard")
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = cfg.distributed.backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
    logger.info("rank %d of %d (%s, %s on %s)", rank, world_size, cfg.distributed.strategy, backend, device)
    return Dist(rank, world_size, local_rank, cfg.distributed.strategy), device


def is_timeout(error: BaseException) -> bool:
    """True for the error a collective raises when it waited past the process group's timeout (gloo:
    "Timed out waiting ...ms", NCCL's watchdog: "... timeout")."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)


def shutdown(group: Dist) -> None:
    if group.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, blocks: nn.ModuleList, group: Dist, device: torch.device,
         compute_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP, or FSDP2 with one shard group per Transformer block plus the root (embeddings, final norm,
    LM head); the module itself when not distributed. Call before building the optimizer: fully_shard
    replaces parameters by sharded DTensors.

    `compute_dtype` (bf16/fp16 training): FSDP gathers the weights in that dtype and reduces gradients
    in fp32 (MixedPrecisionPolicy). Autocast alone would cache a bf16 copy of every gathered weight
    until the forward ends, which would undo the sharding's memory saving.
    """
    if not group.enabled:
        return module
    if group.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        from engine.quant import is_quantized

        # A quantized base's codes are buffers, identical on every rank (quantized deterministically from the
        # same file): broadcasting them before every forward would send the whole base each step.
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=not is_quantized(module))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (group.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The module DDP wraps (FSDP2 changes the module in place, so it is its own unwrapped self)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


@contextlib.contextmanager
def gradient_sync(module: nn.Module, group: Dist, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter for a micro-batch that is not the step's last."""
    if group.enabled and group.strategy == "fsdp":  # a module flag, so set it either way
        module.set_requires_gradient_sync(sync)
        yield
    elif group.enabled and not sync:
        with module.no_sync():
            yield
    else:
        yield


def full_params(model: nn.Module, group: Dist):
    """FSDP: the model's full tensors gathered on rank 0 (None elsewhere), with every rank taking part; a LoRA
    model's adapters only (the frozen base is saved by nobody). Otherwise None: the parameters are whole."""
    if not (group.enabled and group.strategy == "fsdp"):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from engine.adapters.lora import is_lora

    lora = is_lora(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=lora))
    return full if group.is_main else None


class StopRequest:
    """Ctrl-C / SIGTERM, turned into a stop at the end of the current step (which then saves a checkpoint).

    Under torchrun a KeyboardInterrupt raised inside a collective would leave the other ranks waiting in
    theirs, so a signal only sets a flag; `requested()` (called once per step, on every rank) all-reduces it,
    and all ranks then leave the loop together and save one checkpoint. torchrun forwards the terminal's
    Ctrl-C (or its own SIGTERM) to every worker. One process keeps Python's KeyboardInterrupt for Ctrl-C, and
    takes SIGTERM (a job scheduler's stop, `kill`) as a flag like torchrun's workers do.
    """

    def __init__(self, group: Dist):
        self.group, self.flag, self.saved = group, False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM) if group.enabled else (signal.SIGTERM,):
                self.saved[sig] = signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        if not self.group.enabled:
            return self.flag
        return self.group.sum(float(self.flag)) > 0

    def close(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
