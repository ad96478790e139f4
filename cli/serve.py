"""python -m cli.serve --model DIR : an OpenAI-compatible HTTP server with continuous batching.

Needs the `[serve]` extra (pip install -e ".[serve]"): FastAPI + uvicorn.
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from cli.common import DTYPES, exit_on_user_error, load_for_inference

PROG = "cli.serve"
FD_MARGIN = 64  # file descriptors beyond the connection cap: model files, logs, the render process's pipe


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the module docstring's line breaks."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True, help="HF-format model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT layout), merged into the model")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes the server to the network")
    p.add_argument("--port", type=int, default=8000, help="TCP port; checked before the model loads (0: any free one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and compute dtype")
    p.add_argument("--quantize", choices=["int8", "nf4"], default=None,
                   help="store the block linears int8 or NF4 (weight-only; an adapter is merged first)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* routes")
    p.add_argument("--served-model-name", default=None, help="the model id clients send; None: the model dir's name")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="prompt + completion tokens per sequence (capped at the model's positions)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt a request may send")
    p.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (then 413)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond this get 429")
    p.add_argument("--max-connections", type=int, default=512,
                   help="API requests in progress at once, streams and bodies being sent included (then 503); "
                        "/health keeps 8 connections of its own beyond this")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request line and headers (then the connection closes)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send the whole request body (then 408 and the connection closes)")
    p.add_argument("--template-timeout", type=float, default=2.0,
                   help="seconds one chat-template render may run (then it is killed and the request gets 500)")
    p.add_argument("--max-template-chars", type=int, default=1 << 21,
                   help="longest text a chat template may render (then 500)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; None: torch's choice; 1 avoids OpenMP stalls on a busy, shared host")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port: expected 0..65535, got {args.port}")
    for name in ("max_batch", "max_model_len", "max_prompt_tokens", "max_tokens", "max_body_bytes", "max_waiting",
                 "max_connections", "max_template_chars", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    for name in ("header_timeout", "body_timeout", "template_timeout"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')}: expected a positive number of seconds, got {getattr(args, name)}")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api-key: expected a non-empty key")
    return args


def load(args):
    """(model, tokenizer) from --model (and --adapter, merged so serving pays nothing for it)."""
    import torch  # heavy imports after argument errors

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return load_for_inference(args.model, args.adapter, dtype=args.dtype, merge=True, quantize=args.quantize)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use exits 2 at once, not after the load."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may reuse a TIME_WAIT port
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        print(f"{PROG}: error: --host/--port: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    return sock


def check_file_limit(max_connections: int, log) -> None:
    """Raise the open-file soft limit to fit --max-connections where the hard limit allows; else warn."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    from engine.infer.serve.guards import HEALTH_RESERVE

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + HEALTH_RESERVE + FD_MARGIN
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            log.warning("open files are limited to %d (ulimit -n), fewer than --max-connections %d needs (%d): "
                        "connections beyond it fail", target, max_connections, need)


def warm_up(model) -> None:
    """One forward pass before serving: kernels logs the backend it picked now, not on the first request."""
    import torch

    with torch.inference_mode():
        model(torch.zeros(1, 1, dtype=torch.long))


def build_app(args, log):
    """Load the model, log what is served (kernels, adapter, limits) and return the app."""
    from engine.infer.serve.app import ServeLimits, create_app
    from engine.infer.serve.batcher import Batcher
    from engine.infer.serve.guards import HEALTH_RESERVE

    with exit_on_user_error(PROG):
        model, tokenizer = load(args)
    warm_up(model)
    if args.adapter is not None:
        log.info("adapter: %s (LoRA, merged into the weights)", args.adapter)
    cfg = model.config
    eos = cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    batcher = Batcher(model, max_batch=args.max_batch, max_len=args.max_model_len, max_waiting=args.max_waiting)
    name = args.served_model_name or Path(args.model).resolve().name
    limits = ServeLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         max_body_bytes=args.max_body_bytes, header_timeout_s=args.header_timeout,
                         body_timeout_s=args.body_timeout, max_connections=args.max_connections,
                         template_timeout_s=args.template_timeout, max_template_chars=args.max_template_chars)
    app = create_app(batcher, tokenizer, name, api_key=args.api_key, limits=limits, eos_ids=eos_ids)
    cache_mib = 2 * batcher.cache.k.numel() * batcher.cache.k.element_size() / 2**20
    log.info("serving %r (%s, %s) as '%s': %d rows x %d tokens of KV cache (%.0f MiB), API key %s",
             args.model, f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params", args.dtype, name,
             args.max_batch, batcher.max_len, cache_mib, "required" if args.api_key else "not required")
    log.info("limits: %d API connections (+%d for /health), headers within %g s, bodies within %g s, "
             "chat templates within %g s", args.max_connections, HEALTH_RESERVE, args.header_timeout,
             args.body_timeout, args.template_timeout)
    return app


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        import uvicorn

        from engine.infer.serve.guards import server_config
    except ImportError as e:
        print(f"{PROG}: error: serving needs FastAPI and uvicorn: pip install -e \".[serve]\" ({e})", file=sys.stderr)
        sys.exit(2)

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    log = logging.getLogger("engine.infer.serve")
    sock = bind(args.host, args.port)
    with sock:
        check_file_limit(args.max_connections, log)
        app = build_app(args, log)
        if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
            log.warning("listening on %s without --api-key: anyone who can reach this port can use the model",
                        args.host)
        config = server_config(app, host=args.host, port=sock.getsockname()[1], log_level=args.log_level)
        uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
