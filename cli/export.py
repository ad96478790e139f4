"""python -m cli.export --checkpoint DIR [--adapter DIR] --out PATH [--format hf|gguf|gguf-lora] : write a
standalone model.

--checkpoint is an HF model dir, a GGUF file, a training checkpoint, or a LoRA run's adapter dir (final/ or a
checkpoint: its base comes from adapter_config.json's base_model_name_or_path). With an adapter, it is merged into
the base weights (W + alpha/r * B A, in fp32, then cast to --dtype). --format hf (default) writes an HF dir that
loads with transformers and the engine alone; --format gguf writes one GGUF file (--gguf-type f32, f16, bf16,
q8_0 or q4_0) for llama.cpp, Ollama or LM Studio; --format gguf-lora writes the adapter alone as a GGUF LoRA
adapter (llama.cpp's `--lora`), in the layout llama.cpp's convert_lora_to_gguf.py writes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cli.common import DTYPES, exit_on_user_error, load_for_inference
from engine.adapters.peft_format import ADAPTER_CONFIG
from engine.config import ConfigError

FORMATS = ("hf", "gguf", "gguf-lora")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # engine.model.gguf_write.GGUF_TYPES (gguf imported lazily)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cli.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF model dir, GGUF file, training checkpoint or LoRA "
                                                       "adapter dir")
    p.add_argument("--adapter", help="a PEFT LoRA adapter dir to merge into --checkpoint")
    p.add_argument("--out", required=True, help="output directory (hf) or file (gguf, gguf-lora)")
    p.add_argument("--format", default="hf", choices=FORMATS, help="hf: config.json + safetensors + tokenizer; "
                   "gguf: one llama.cpp file, adapter merged; gguf-lora: the adapter as a llama.cpp LoRA file")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the written weights (hf)")
    p.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES,
                   help="tensor type of a gguf file (norms and 1-D tensors stay f32, as llama.cpp writes them)")
    return p.parse_args(argv)


def _check_out(checkpoint: Path, out: Path, adapter) -> None:
    if out.resolve() in {checkpoint.resolve(), *([Path(adapter).resolve()] if adapter else [])}:
        raise ConfigError(f"--out {out}: must differ from the input directories")


def export(checkpoint, out, adapter=None, dtype=torch.float32) -> Path:
    """Merge (when there is an adapter) and save `checkpoint` as an HF model + tokenizer in `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    _check_out(checkpoint, out, adapter)
    # merged in fp32, then cast: rounding once, after W + alpha/r * B A
    model, tokenizer = load_for_inference(checkpoint, adapter, dtype="fp32", merge=True, require_tokenizer=False)
    model.to(dtype).save_pretrained(out)
    if tokenizer is None:
        print(f"cli.export: warning: no tokenizer.json in {checkpoint}{' or ' + str(adapter) if adapter else ''}; "
              "wrote the model only", file=sys.stderr)
    else:
        tokenizer.save_pretrained(out)
    return out


def export_gguf(checkpoint, out, adapter=None, gguf_type: str = "f16") -> Path:
    """Merge (when there is an adapter) and write `checkpoint` with its tokenizer as one GGUF file `out`."""
    from engine.model.gguf_write import write_gguf

    checkpoint, out = Path(checkpoint), Path(out)
    _check_out(checkpoint, out, adapter)
    model, tokenizer = load_for_inference(checkpoint, adapter, dtype="fp32", merge=True, require_tokenizer=True)
    return write_gguf(model, tokenizer, out, gguf_type)


def export_gguf_lora(checkpoint, out, adapter=None) -> Path:
    """Write the LoRA adapter of `checkpoint` (a run's adapter dir) or `adapter` as a GGUF LoRA file `out`."""
    from engine.adapters.gguf_lora import write_gguf_lora

    checkpoint, out = Path(checkpoint), Path(out)
    _check_out(checkpoint, out, adapter)
    model, _ = load_for_inference(checkpoint, adapter, dtype="fp32", merge=False, require_tokenizer=False)
    return write_gguf_lora(model, out)


def main(argv=None) -> None:
    args = parse_args(argv)
    with exit_on_user_error("cli.export"):
        merged = args.adapter or (Path(args.checkpoint) / ADAPTER_CONFIG).is_file()
        if args.format == "gguf":
            out = export_gguf(args.checkpoint, args.out, args.adapter, args.gguf_type)
            print(f"wrote {out} (gguf {args.gguf_type}{', adapter merged' if merged else ''})")
        elif args.format == "gguf-lora":
            out = export_gguf_lora(args.checkpoint, args.out, args.adapter)
            print(f"wrote {out} (gguf LoRA adapter; llama-cli -m BASE.gguf --lora {out})")
        else:
            out = export(args.checkpoint, args.out, args.adapter, DTYPES[args.dtype])
            print(f"wrote {out} ({args.dtype}{', adapter merged' if merged else ''})")


if __name__ == "__main__":
    main()
