"""python -m cli.export --checkpoint DIR [--adapter DIR] --out DIR [--dtype bf16] : write a standalone HF model.

--checkpoint is an HF model dir, a training checkpoint, or a LoRA run's adapter dir (final/ or a checkpoint:
its base comes from adapter_config.json's base_model_name_or_path). With an adapter, it is merged into the base
weights (W + alpha/r * B A, in fp32, then cast to --dtype). The output loads with transformers and the engine alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cli.common import DTYPES, exit_on_user_error, load_for_inference
from engine.adapters.peft_format import ADAPTER_CONFIG
from engine.config import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cli.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF model dir, training checkpoint or LoRA adapter dir")
    p.add_argument("--adapter", help="a PEFT LoRA adapter dir to merge into --checkpoint")
    p.add_argument("--out", required=True, help="output directory (config.json, safetensors, tokenizer)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the written weights")
    return p.parse_args(argv)


def export(checkpoint, out, adapter=None, dtype=torch.float32) -> Path:
    """Merge (when there is an adapter) and save `checkpoint` as an HF model + tokenizer in `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() in {checkpoint.resolve(), *([Path(adapter).resolve()] if adapter else [])}:
        raise ConfigError(f"--out {out}: must differ from the input directories")
    # merged in fp32, then cast: rounding once, after W + alpha/r * B A
    model, tokenizer = load_for_inference(checkpoint, adapter, dtype="fp32", merge=True, require_tokenizer=False)
    model.to(dtype).save_pretrained(out)
    if tokenizer is None:
        print(f"cli.export: warning: no tokenizer.json in {checkpoint}{' or ' + str(adapter) if adapter else ''}; "
              "wrote the model only", file=sys.stderr)
    else:
        tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    with exit_on_user_error("cli.export"):
        out = export(args.checkpoint, args.out, args.adapter, DTYPES[args.dtype])
        print(f"wrote {out} ({args.dtype}{', adapter merged' if args.adapter or (Path(args.checkpoint) / ADAPTER_CONFIG).is_file() else ''})")


if __name__ == "__main__":
    main()
