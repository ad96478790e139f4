"""Decode and prefill tokens/s: engine vs transformers on the same ~35M Llama checkpoint, batch 1.

    pytest bench/bench_generate.py --benchmark-only       # pytest-benchmark tables, grouped by phase x dtype
    python bench/bench_generate.py                        # interleaved trials -> markdown table with ratios

Decode: 128 new tokens after an 8-token prompt (prefill is one step of 8, negligible), greedy, no EOS.
Prefill: one forward over a 512-token prompt, filling the KV cache.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.llama35m import write_llama35m  # noqa: E402
from engine import Transformer, generate  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DECODE_TOKENS, DECODE_PROMPT, PREFILL_TOKENS = 128, 8, 512


def load(impl: str, dtype: str, directory: Path):
    if impl == "engine":
        return Transformer.from_pretrained(directory, dtype=DTYPES[dtype])
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype]).eval()


def decode_fn(impl: str, model):
    prompt = torch.randint(0, 32000, (1, DECODE_PROMPT), generator=torch.Generator().manual_seed(0))
    if impl == "engine":
        return lambda: generate(model, prompt, DECODE_TOKENS, eos_token_id=[])
    mask = torch.ones_like(prompt)
    return lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=DECODE_TOKENS,
                                  min_new_tokens=DECODE_TOKENS, do_sample=False, pad_token_id=0)


def prefill_fn(impl: str, model):
    prompt = torch.randint(0, 32000, (1, PREFILL_TOKENS), generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def engine_prefill():
        cache = model.new_cache(1, PREFILL_TOKENS + 1)
        return model.lm_head(model.hidden_states(prompt, cache=cache)[:, -1])

    @torch.inference_mode()
    def hf_prefill():
        return model(prompt, use_cache=True, logits_to_keep=1).logits

    return engine_prefill if impl == "engine" else hf_prefill


PHASES = {"decode": (decode_fn, DECODE_TOKENS), "prefill": (prefill_fn, PREFILL_TOKENS)}


@pytest.fixture(scope="module")
def checkpoint():
    return write_llama35m()


@pytest.mark.parametrize("impl", ["engine", "transformers"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("phase", list(PHASES))
def test_generation_speed(benchmark, checkpoint, phase, dtype, impl):
    make, tokens = PHASES[phase]
    fn = make(impl, load(impl, dtype, checkpoint))
    fn()  # warm-up: allocator, oneDNN primitives
    benchmark.group = f"{phase}-{dtype}"
    benchmark.extra_info["tokens"] = tokens
    benchmark.pedantic(fn, rounds=3 if phase == "decode" else 5, iterations=1)
    benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.median


def main(trials: int = 5) -> None:
    """Interleave engine and transformers trials (noise hits both alike); print medians and ratios."""
    directory = write_llama35m()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| phase | dtype | transformers tok/s | engine tok/s | engine / transformers |")
    print("|---|---|---|---|---|")
    for dtype in DTYPES:
        models = {impl: load(impl, dtype, directory) for impl in ("engine", "transformers")}
        for phase, (make, tokens) in PHASES.items():
            fns = {impl: make(impl, m) for impl, m in models.items()}
            rates = {impl: [] for impl in fns}
            for fn in fns.values():
                fn()
            for _ in range(trials):
                for impl, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    rates[impl].append(tokens / (time.perf_counter() - t0))
            hf, ours = (statistics.median(rates[i]) for i in ("transformers", "engine"))
            print(f"| {phase} | {dtype} | {hf:.0f} | {ours:.0f} | {ours / hf:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
