"""python -m cli.generate --model DIR --prompt "..." : stream a completion to the terminal."""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from cli.common import DTYPES, exit_on_user_error, load_for_inference
from engine import generate_stream
from engine.data.tokenizer import IncrementalDecoder


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cli.generate", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="HF model dir or hub id, a training checkpoint, or a LoRA run's adapter dir (its base is found)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter dir (PEFT layout) to apply on top of --model")
    p.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user message)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (EOS stops earlier)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (None: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens with this mass")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (None: not reproducible)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the weights")
    p.add_argument("--quantize", choices=["int8", "nf4"], default=None,
                   help="store the block linears int8 or NF4 (weight-only; decoding reads fewer bytes per token)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        p.error(f"--max-new-tokens: expected >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature: expected >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p: expected a value in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k <= 0:
        p.error(f"--top-k: expected a positive integer, got {args.top_k}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with exit_on_user_error("cli.generate"):
        model, tokenizer = load_for_inference(args.model, args.adapter, dtype=args.dtype, quantize=args.quantize)
        if args.chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                add_generation_prompt=True, tokenize=True)
        else:
            ids = tokenizer.encode(args.prompt)
        try:
            stream = generate_stream(model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                     eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None
                                     else model.config.eos_token_id)
            start = time.perf_counter()
            first = next(stream, None)  # argument and length errors surface here, before any output
            decoder, n = IncrementalDecoder(tokenizer), 0
            sys.stdout.write(args.prompt if not args.chat else "")
            for token in itertools.chain([first] if first is not None else [], stream):
                sys.stdout.write(decoder.push(int(token[0])))
                sys.stdout.flush()
                n += 1
            sys.stdout.write(decoder.flush())
        except ValueError as e:  # a prompt longer than the model's context
            print(f"cli.generate: error: {e}", file=sys.stderr)
            sys.exit(2)
        elapsed = time.perf_counter() - start
        print(f"\n[{n} tokens in {elapsed:.2f}s, {n / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
