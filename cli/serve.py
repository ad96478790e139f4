"""python -m cli.serve --model DIR : an OpenAI-compatible HTTP server with continuous batching.

Needs the `[serve]` extra (pip install -e ".[serve]"): FastAPI + uvicorn.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cli.common import DTYPES, exit_on_user_error, load_for_inference

PROG = "cli.serve"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF-format model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT layout), merged into the model")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* routes")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the dir's name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="prompt + completion tokens per sequence (capped at the model's positions)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond this get 429")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 avoids OpenMP stalls on a busy, shared host")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port: expected 0..65535, got {args.port}")
    for name in ("max_batch", "max_model_len", "max_prompt_tokens", "max_tokens", "max_body_bytes", "max_waiting",
                 "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api-key: expected a non-empty key")
    return args


def load(args):
    """(model, tokenizer) from --model (and --adapter, merged so serving pays nothing for it)."""
    import torch  # heavy imports after argument errors

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return load_for_inference(args.model, args.adapter, dtype=args.dtype, merge=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        import uvicorn

        from engine.infer.serve.app import ServeLimits, create_app
    except ImportError as e:
        print(f"{PROG}: error: serving needs FastAPI and uvicorn: pip install -e \".[serve]\" ({e})", file=sys.stderr)
        sys.exit(2)
    from engine.infer.serve.batcher import Batcher

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    log = logging.getLogger("engine.infer.serve")
    with exit_on_user_error(PROG):
        model, tokenizer = load(args)
    cfg = model.config
    eos = cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    batcher = Batcher(model, max_batch=args.max_batch, max_len=args.max_model_len, max_waiting=args.max_waiting)
    name = args.served_model_name or Path(args.model).resolve().name
    limits = ServeLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         max_body_bytes=args.max_body_bytes)
    app = create_app(batcher, tokenizer, name, api_key=args.api_key, limits=limits, eos_ids=eos_ids)
    cache_mib = 2 * batcher.cache.k.numel() * batcher.cache.k.element_size() / 2**20
    log.info("serving %r (%s, %s) as '%s': %d rows x %d tokens of KV cache (%.0f MiB), API key %s",
             args.model, f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params", args.dtype, name,
             args.max_batch, batcher.max_len, cache_mib, "required" if args.api_key else "not required")
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
