"""Issue 14's dense families on every path after loading: per-row KV caches (serving), the Batcher, a LoRA
run with grad accumulation and its merged export (which transformers loads), and the memory planner."""
import threading
from contextlib import closing

import pytest
import torch

from engine import Transformer, generate
from engine.infer.serve.batcher import Batcher, SamplingParams

NEW = ["gemma2", "gemma3", "phi3", "olmo2", "smollm3"]


@pytest.mark.parametrize("family", NEW)
def test_per_row_cache_decodes_rows_of_different_lengths_exactly(hf_checkpoint, family):
    """Rows prefilled to lengths 3, 9, 6 then decoded together past the window (8) match a full forward of
    each sequence alone (soft caps, per-layer windows and RoPE, NoPE layers, LongRoPE switching at 16)."""
    model = Transformer.from_pretrained(hf_checkpoint(family)[0]).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (3, 9, 6)]
    cache = model.new_cache(4, 40, per_row=True)
    with torch.inference_mode():
        for r, s in enumerate(seqs):
            slot = cache.rows(r, r + 1)
            slot.lengths, slot.pos = None, 0
            s.append(int(model(torch.tensor([s]), cache=slot)[0, -1].argmax()))
            cache.lengths[r] = len(s) - 1
        for _ in range(10):
            step = model(torch.tensor([[s[-1]] for s in seqs]), cache=cache.rows(0, 3))[:, -1]  # (3, V)
            for r, s in enumerate(seqs):
                # longrope: past 16 positions the cached keys keep their short-factor rotation (as in
                # transformers), so a full recompute differs from then on by design
                if family != "phi3" or max(map(len, seqs)) <= 16:
                    torch.testing.assert_close(step[r], model(torch.tensor([s]))[0, -1], atol=1e-5, rtol=1e-5)
                s.append(int(step[r].argmax()))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_batcher_matches_generate(hf_checkpoint, family):
    model = Transformer.from_pretrained(hf_checkpoint(family)[0]).eval()
    with closing(Batcher(model, max_batch=3, max_len=64)) as batcher:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (2, 7, 11)]
        lengths = [12, 5, 9]
        results = [None] * len(prompts)

        def run(i):
            results[i] = batcher.generate(prompts[i], SamplingParams(max_tokens=lengths[i]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for p, n, (tokens, finish) in zip(prompts, lengths, results):
            assert (tokens, finish) == (generate(model, torch.tensor([p]), n, eos_token_id=[])[0, len(p):].tolist(),
                                        "length")


@pytest.mark.parametrize("family", NEW)
def test_lora_run_with_grad_accumulation_exports_a_model_transformers_loads(tmp_path, family):
    import transformers

    from cli.export import export
    from engine.adapters.peft_format import load_with_adapter
    from engine.train.loop import train
    from tests.finetune_fixtures import lora_run_config, pretrained_dir

    base = pretrained_dir(tmp_path / "base", family=family)
    result = train(lora_run_config(tmp_path, base, max_steps=4, grad_accum=2, eval_every=0, save_every=0),
                   progress=False)
    assert result.losses[-1][1] < result.losses[0][1]
    export(result.final_dir, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    expected = load_with_adapter(result.final_dir)
    ids = torch.randint(0, expected.config.vocab_size, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, expected(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", NEW)
def test_memory_plan_walks_every_family(hf_checkpoint, family):
    """The planner's symbolic walk covers each family's layers (post-norm only, projection q/k norm, capped attention)."""
    from engine.config import RunConfig, from_dict
    from engine.train.memory_plan import estimate_memory

    model = Transformer.from_pretrained(hf_checkpoint(family)[0])
    cfg = from_dict(RunConfig, {"model": {"from_pretrained": "unused"}, "data": {"train": "x.txt", "seq_len": 32},
                                "train": {"batch_size": 2, "max_steps": 1}}, where="")
    plan = estimate_memory(model.config, cfg, 1, "cpu")
    assert plan.peak > 4 * model.config.num_params  # at least the fp32 weights


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_fsdp_on_two_ranks_matches_one_process(tmp_path, family):
    """Full fine-tuning under torchrun FSDP2 (2 CPU ranks, gloo): soft-capped sandwich blocks / fused-qkv
    blocks shard like any other, and the losses equal one process with grad_accum=2."""
    from engine.config import RunConfig, from_dict
    from engine.train.loop import train
    from tests.finetune_fixtures import lora_run_dict, pretrained_dir
    from tests.train.test_distributed import _losses, _torchrun

    base = pretrained_dir(tmp_path / "base", family=family)

    def run_dict(where, **train_keys):
        d = lora_run_dict(where, base, max_steps=3, eval_every=0, save_every=0, lr=1e-3, **train_keys)
        d.pop("lora")
        return d

    train(from_dict(RunConfig, run_dict(tmp_path / "one", grad_accum=2), where=""), progress=False)
    result = _torchrun({**run_dict(tmp_path / "two"), "distributed": {"strategy": "fsdp"}}, tmp_path / "fsdp.json")
    assert result.returncode == 0, result.stderr[-3000:]
    losses, ref = _losses(tmp_path / "two" / "run")[0], _losses(tmp_path / "one" / "run")[0]
    assert len(losses) == 3
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-6)
