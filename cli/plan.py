"""python -m cli.plan config.json [--nproc N] [--set KEY=VALUE ...] : estimated memory per rank, before anything is allocated.

Prints weights / grads / optimizer state / activations / workspace and the peak per rank (engine/train/memory_plan.py
explains the model), what LoRA saves against full fine-tuning and FSDP against DDP, and warns on stderr
when the peak does not fit the available RAM (all ranks of a CPU run share it) or free VRAM.
"""
from __future__ import annotations

import argparse
import os
import sys

from cli.common import add_set_argument, exit_on_user_error
from engine.config import ConfigError, load_run_config
from engine.train.memory_plan import alternatives, available_memory, estimate_memory, plan_device, plan_model_config

EXAMPLE_NPROC = 4  # the rank count FSDP vs DDP is shown at when the plan itself is for one process


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cli.plan", description=__doc__.split("\n", 1)[0])
    p.add_argument("config", help="run config JSON (see configs/quickstart.json)")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks (torchrun --nproc_per_node); default: $WORLD_SIZE, else 1")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="plan for this device; default: train.device (auto: cuda when available)")
    add_set_argument(p, example="train.batch_size=32")
    return p.parse_args(argv)


def fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def world_size(nproc) -> int:
    if nproc is not None:
        value, where = nproc, "--nproc"
    else:
        value, where = os.environ.get("WORLD_SIZE", "1"), "WORLD_SIZE"
    try:
        value = int(value)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise ConfigError(f"{where}: expected an integer >= 1, got {nproc if nproc is not None else os.environ['WORLD_SIZE']!r}")
    return value


def table(plan, cfg) -> list[str]:
    t = cfg.train
    base = "fp32 master weights"
    if cfg.lora is not None:
        base = f"{cfg.lora.base_dtype} frozen base + fp32 adapters"
    if plan.strategy == "fsdp":
        base += f", 1/{plan.world_size} shard"
    rows = [("weights", plan.weights, base),
            ("grads", plan.grads, "fp32, trainable parameters only"),
            ("optimizer state", plan.optimizer, "AdamW exp_avg + exp_avg_sq, fp32"),
            ("activations", plan.activations, "saved for backward" +
             (" (layer inputs + one recomputed layer)" if t.activation_checkpointing else "")),
            ("workspace", sum(plan.workspace.values()), "")]
    rows += [(f"  {name}", size, "") for name, size in plan.workspace.items()]
    lines = [f"  {name:<32}{fmt(size):>12}   {note}".rstrip() for name, size, note in rows]
    lines.append(f"  {'peak per rank':<32}{fmt(plan.peak):>12}   at {plan.peak_phase} (the rows do not all "
                 "coexist: grads fill in as activations are freed)")
    return lines


def savings(plan, alts, shard, cfg, world: int) -> list[str]:
    """LoRA vs full fine-tuning (`alts`, at the run's rank count) and FSDP vs DDP (`shard`, at > 1 rank)."""
    lines = []
    if "lora" not in alts:
        lines.append("LoRA: not applicable (it adapts a pretrained model: model.from_pretrained)")
    elif cfg.lora is not None:
        full = alts["full"].peak
        lines.append(f"LoRA: r={cfg.lora.rank} on {','.join(cfg.lora.targets)}, {plan.trainable_params / 1e6:.2f}M "
                     f"trainable; full fine-tuning would need {fmt(full)} per rank (LoRA saves {fmt(full - plan.peak)})")
    else:
        lora = alts["lora"]
        lines.append(f"LoRA (defaults: r=8 on q,k,v,o_proj, fp32 base; base_dtype bf16 halves the base): "
                     f"{fmt(lora.peak)} per rank (saves {fmt(plan.peak - lora.peak)} against full fine-tuning)")
    ddp, fsdp, n = shard["ddp"].peak, shard["fsdp"].peak, shard["ddp"].world_size
    where = f"at {n} ranks" if world > 1 else f"nothing to shard in one process; at --nproc {n}"
    lines.append(f"FSDP vs DDP: {where}: DDP {fmt(ddp)}, FSDP {fmt(fsdp)} per rank (FSDP saves {fmt(ddp - fsdp)})"
                 + ("; with LoRA, FSDP shards the frozen base too" if cfg.lora is not None else ""))
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    with exit_on_user_error("cli.plan"):
        cfg = load_run_config(args.config, args.overrides)
        world = world_size(args.nproc)
        device = args.device or plan_device(cfg.train.device)
        mc = plan_model_config(cfg)
        plan = estimate_memory(mc, cfg, world, device)
        alts = alternatives(mc, cfg, world, device)
        shard = alts if world > 1 else alternatives(mc, cfg, EXAMPLE_NPROC, device)
    t = cfg.train
    kind = "full fine-tuning" if cfg.lora is None else "LoRA"
    if cfg.model.from_pretrained is None:
        kind = "training from scratch"
    print(f"memory plan: {args.config}")
    print(f"  model: {plan.total_params / 1e6:.2f}M params, {plan.trainable_params / 1e6:.2f}M trainable ({kind}), "
          f"{mc.num_layers} layers, hidden {mc.hidden_size}, vocab {mc.vocab_size}")
    print(f"  step: {t.batch_size} x {cfg.data.seq_len} tokens per micro-batch (x{t.grad_accum} accumulation), "
          f"{t.precision}{' autocast' if t.precision != 'fp32' else ''}"
          f"{', activation checkpointing' if t.activation_checkpointing else ''}, on {device}, "
          f"{plan.strategy if world == 1 else f'{world} ranks ({plan.strategy})'}")
    print("\n".join(table(plan, cfg)))
    print("\n".join(savings(plan, alts, shard, cfg, world)))
    need = plan.peak * world if device == "cpu" else plan.peak  # CPU ranks on one host share its RAM
    who = f"{world} ranks x {fmt(plan.peak)}" if device == "cpu" and world > 1 else fmt(plan.peak)
    available = available_memory(device, world)
    if available is None:
        print(f"available: unknown (no {device} device on this machine); the plan needs {who}")
    else:
        free, what = available
        print(f"available: {fmt(free)} {what}; the plan needs {who}" + ("" if need > free else ": fits"))
    cache = ""
    if device == "cpu" and cfg.lora is not None and cfg.lora.base_dtype in ("nf4", "int8"):
        from engine.quant.heap import CACHE_LIMIT

        cache = f"; a quantized base's CPU block cache keeps up to {fmt(CACHE_LIMIT)} of freed blocks"
    print("not counted: the Python/torch runtime itself (a few hundred MiB of RSS; CUDA adds its context), and "
          f"allocator slack (glibc keeps freed blocks, the CUDA caching allocator fragments{cache})")
    if available is not None and need > available[0]:
        print(f"cli.plan: warning: the estimated peak ({who}) exceeds the {available[1]} ({fmt(available[0])}); "
              "lower train.batch_size or data.seq_len, or set train.activation_checkpointing, lora, or "
              "distributed.strategy=fsdp", file=sys.stderr)


if __name__ == "__main__":
    main()
