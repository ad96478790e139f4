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

from cli.common import DTYPES, exit_on_user_error
from engine.config import ConfigError
from engine.adapters.lora import is_lora, merge_lora
from engine.adapters.peft_format import ADAPTER_CONFIG, load_with_adapter, read_adapter_config
from engine.data.tokenizer import Tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cli.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF model dir, training checkpoint or LoRA adapter dir")
    p.add_argument("--adapter", help="a PEFT LoRA adapter dir to merge into --checkpoint")
    p.add_argument("--out", required=True, help="output directory (config.json, safetensors, tokenizer)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the written weights")
    return p.parse_args(argv)


def tokenizer_dir(*candidates) -> Path | None:
    """The first of `candidates` holding a tokenizer.json (the adapter's own, then the base's)."""
    return next((Path(c) for c in candidates if c is not None and (Path(c) / "tokenizer.json").is_file()), None)


def export(checkpoint, out, adapter=None, dtype=torch.float32) -> Path:
    """Merge (when there is an adapter) and save `checkpoint` as an HF model + tokenizer in `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() in {checkpoint.resolve(), *([Path(adapter).resolve()] if adapter else [])}:
        raise ConfigError(f"--out {out}: must differ from the input directories")
    base = checkpoint
    if adapter is None and (checkpoint / ADAPTER_CONFIG).is_file():
        base = Path(read_adapter_config(checkpoint)[1] or checkpoint)
    model = load_with_adapter(checkpoint, adapter)
    if is_lora(model):
        merge_lora(model)
    model.to(dtype).save_pretrained(out)
    source = tokenizer_dir(adapter, checkpoint, base)
    if source is None:
        print(f"cli.export: warning: no tokenizer.json in {checkpoint}{' or ' + str(adapter) if adapter else ''}; "
              "wrote the model only", file=sys.stderr)
    else:
        Tokenizer.from_pretrained(source).save_pretrained(out)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    with exit_on_user_error("cli.export"):
        out = export(args.checkpoint, args.out, args.adapter, DTYPES[args.dtype])
        print(f"wrote {out} ({args.dtype}{', adapter merged' if args.adapter or (Path(args.checkpoint) / ADAPTER_CONFIG).is_file() else ''})")


if __name__ == "__main__":
    main()
