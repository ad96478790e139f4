"""The memory planner: its estimate against the measured peak of real training steps, and `python -m cli.plan`.

How the peak is measured (see `measure` below, run as `python -m tests.train.test_memory_plan SPEC` in a fresh process):
  - a tiny warm-up step first, so the runtime's one-time allocations are not counted;
  - measured: the high-water mark of live tensor bytes over two steps of the configured model (the second one
    holds the optimizer state), from the profiler's allocation events (tests/peak_memory.py): what the planner
    estimates, the same on every machine;
  - RSS growth over the same steps is printed beside it. It adds the runtime's own memory (heap slack, library
    buffers), which varies by machine: this machine reads a few % above the tensor peak, a CI machine once read
    +57 MiB on the LoRA case. MALLOC_MMAP_THRESHOLD_ is pinned so glibc returns freed blocks and RSS stays close.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, ModelConfig, RunConfig, from_dict
from engine.config.model import PER_LAYER
from engine.model.families import config_to_hf
from engine.train.memory_plan import estimate_memory, lora_params, plan_model_config

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20
TOLERANCE = 0.25  # the bar: estimate within +-25% of the measured peak
# ~9M parameters and 2048-token micro-batches: a few hundred MiB of training memory, so activations,
# weights and optimizer state all count, and two steps take about a second on 2 cores.
ARCH = {"vocab_size": 8192, "hidden_size": 256, "num_layers": 6, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 64, "intermediate_size": 704, "max_position_embeddings": 512}
MEASURED = {  # name -> (train.*, lora.* or None)
    "fp32": ({}, None),
    "bf16": ({"precision": "bf16"}, None),
    "fp32 activation checkpointing": ({"activation_checkpointing": True}, None),
    "bf16 LoRA, bf16 base": ({"precision": "bf16"}, {"rank": 8, "targets": "all-linear", "base_dtype": "bf16"}),
    "fp32 per-layer windows, RoPE bases, post-norms": ({}, None),
    "bf16 per-layer windows, RoPE bases, post-norms": ({"precision": "bf16"}, None),
    "bf16 Gemma 2 soft caps, sandwich norms": ({"precision": "bf16"}, None),
}
# Layers that differ (Gemma-2-like alternation, a NoPE layer, post-norms): the plan walks each one.
LAYERED = {"layer_sliding_windows": [None, 64] * 3, "layer_rope_thetas": [1e4, 1e6, 1e4, 1e6, 1e4, None],
           "post_attn_norm": True, "post_mlp_norm": True}
MEASURED_ARCH = {name: {**ARCH, **LAYERED} for name in MEASURED if "per-layer" in name}
# Gemma 2: soft-capped, scaled attention (engine.model.attention's chunked path) and a capped fused loss
MEASURED_ARCH["bf16 Gemma 2 soft caps, sandwich norms"] = {
    **ARCH, **LAYERED, "attn_softcap": 50.0, "final_softcap": 30.0, "query_pre_attn_scalar": 96,
    "norm_weight_offset": 1.0, "scale_embeddings": True, "activation": "gelu_tanh"}
# Mixture of experts (engine.model.moe): 8 experts, top-2, a sigmoid-gated shared expert, one dense layer.
MOE = {"mlp_class": "moe", "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 352,
       "shared_expert_intermediate_size": 176, "mlp_only_layers": [0], "router_aux_loss_coef": 0.01}
MEASURED.update({"fp32 mixture of experts": ({}, None), "bf16 mixture of experts": ({"precision": "bf16"}, None)})
MEASURED_ARCH.update({name: {**ARCH, **MOE} for name in MEASURED if "experts" in name})


def run_dict(train: dict | None = None, lora: dict | None = None, arch: dict | None = None, seq_len: int = 256) -> dict:
    model = ({"from_pretrained": "unused-by-the-planner"} if lora is not None
             else {"architecture": arch or ARCH, "bpe_vocab_size": 4096})
    out = {"model": model, "data": {"train": "unused.txt", "seq_len": seq_len},
           "train": {"batch_size": 8, "max_steps": 10, **(train or {})}}
    if lora is not None:
        out["lora"] = lora
    return out


def run_config(**kwargs) -> RunConfig:
    return from_dict(RunConfig, run_dict(**kwargs), where="")


# ---------------------------------------------------------------------------- measured vs estimated


def _steps(cfg: RunConfig, mc: ModelConfig, n: int) -> None:
    """n optimizer steps on random tokens, the model built as engine.build.build_model does (no checkpoint on disk)."""
    import torch

    from engine.adapters.lora import apply_lora
    from engine.model.transformer import Transformer
    from engine.train.loop import make_optimizer, train_step

    model = Transformer(mc)
    if cfg.lora is not None:
        if cfg.lora.base_dtype == "bf16":
            model = model.to(torch.bfloat16)
        apply_lora(model, cfg.lora)
    model.gradient_checkpointing = cfg.train.activation_checkpointing
    model.train()
    optimizer = make_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    for _ in range(n):
        batch = [(torch.randint(0, mc.vocab_size, shape, generator=g), torch.randint(0, mc.vocab_size, shape, generator=g))]
        train_step(model, optimizer, batch, device=torch.device("cpu"), precision=cfg.train.precision)


def measure(spec: dict) -> dict:
    """Peak training memory of `spec`'s run (tensor bytes, and RSS growth), and the planner's estimate."""
    import gc

    from tests.peak_memory import measure_peaks

    cfg, mc = from_dict(RunConfig, spec["run"], where=""), ModelConfig.from_dict(spec["arch"])
    first_layer = {f: getattr(mc, f)[:1] for f in PER_LAYER if getattr(mc, f) is not None}
    tiny = dataclasses.replace(mc, vocab_size=64, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                               intermediate_size=64, num_layers=1, **first_layer)
    _steps(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=1)), tiny, 2)  # warm-up
    gc.collect()
    return {**measure_peaks(lambda: _steps(cfg, mc, 2)), "estimated": estimate_memory(mc, cfg, 1, "cpu").peak}


@pytest.fixture(scope="module")
def measured():
    """name -> {"measured", "estimated"}: every MEASURED config in its own process, two at a time."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    procs, results = {}, {}
    for name, (train, lora) in MEASURED.items():
        spec = {"run": run_dict(train, lora), "arch": MEASURED_ARCH.get(name, ARCH)}
        procs[name] = subprocess.Popen([sys.executable, "-m", "tests.train.test_memory_plan", json.dumps(spec)], cwd=ROOT,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if len(procs) % 2 == 0:  # two cores: two at a time
            for n in list(procs)[-2:]:
                procs[n].wait(timeout=300)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.mark.skipif(sys.platform != "linux", reason="reads RSS from /proc; ru_maxrss units differ elsewhere")
@pytest.mark.parametrize("name", list(MEASURED))
def test_estimate_is_within_25_percent_of_measured_peak(measured, name):
    m = measured[name]
    ratio = m["estimated"] / m["measured"]
    print(f"{name}: measured {m['measured'] / MiB:.1f} MiB (RSS growth {m['rss_growth'] / MiB:.1f} MiB), "
          f"estimated {m['estimated'] / MiB:.1f} MiB ({ratio:.2f}x)")
    assert abs(ratio - 1) <= TOLERANCE, (f"{name}: estimated {m['estimated'] / MiB:.1f} MiB vs measured "
                                         f"{m['measured'] / MiB:.1f} MiB ({ratio:.2f}x)")


@pytest.mark.skipif(sys.platform != "linux", reason="reads RSS from /proc; ru_maxrss units differ elsewhere")
@pytest.mark.parametrize("strategy,lora_base", [("ddp", None), ("fsdp", None), ("fsdp", "bf16")])
def test_per_rank_estimate_under_torchrun_is_within_25_percent(strategy, lora_base, tmp_path):
    """2 real gloo ranks, bf16 (FSDP: sharded weights, grads and state, bf16 gathers; DDP: gradient buckets;
    LoRA: a sharded bf16 base with fp32 adapters)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [strategy, "bf16", str(tmp_path), *([lora_base] if lora_base else [])]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "tests.plan_ranks", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert len(ranks) == 2
    for m in ranks:
        ratio = m["estimated"] / m["measured"]
        print(f"{strategy}{' LoRA' if lora_base else ''} rank {m['rank']}: measured {m['measured'] / MiB:.1f} MiB (RSS growth "
              f"{m['rss_growth'] / MiB:.1f} MiB), estimated {m['estimated'] / MiB:.1f} MiB ({ratio:.2f}x)")
        assert abs(ratio - 1) <= TOLERANCE, (f"{strategy} rank {m['rank']}: estimated {m['estimated'] / MiB:.1f} "
                                             f"MiB vs measured {m['measured'] / MiB:.1f} MiB ({ratio:.2f}x)")


# ---------------------------------------------------------------------------- the estimate's parts


def test_lora_trains_and_stores_only_the_adapters():
    mc = ModelConfig.from_dict(ARCH)
    cfg = run_config(lora={"rank": 8, "targets": ["q_proj", "v_proj"], "base_dtype": "bf16"})
    plan = estimate_memory(mc, cfg)
    adapters = 6 * 8 * ((256 + 256) + (256 + 128))  # layers * rank * (in + out) of q_proj and v_proj
    assert lora_params(mc, cfg.lora) == plan.trainable_params == adapters
    assert plan.grads == 4 * adapters and plan.optimizer == 8 * adapters
    assert plan.weights == 2 * mc.num_params + 4 * adapters  # bf16 base + fp32 adapters
    assert plan.peak < estimate_memory(mc, dataclasses.replace(cfg, lora=None)).peak


def test_fsdp_shards_weights_grads_and_state_ddp_adds_buckets():
    mc, cfg = ModelConfig.from_dict(ARCH), run_config()
    single = estimate_memory(mc, cfg)
    ddp = estimate_memory(mc, cfg, world_size=4)
    fsdp = estimate_memory(mc, dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, strategy="fsdp")), 4)
    assert ddp.peak == single.peak + single.grads and ddp.workspace["DDP gradient buckets"] == single.grads
    assert (fsdp.weights, fsdp.grads, fsdp.optimizer) == tuple(-(-x // 4) for x in (single.weights, single.grads,
                                                                                      single.optimizer))
    assert fsdp.peak < ddp.peak and fsdp.activations == ddp.activations


def test_activations_scale_with_tokens_and_shrink_with_checkpointing():
    mc = ModelConfig.from_dict(ARCH)
    small, big = (estimate_memory(mc, run_config(train={"batch_size": b})) for b in (4, 8))
    assert big.activations == pytest.approx(2 * small.activations, rel=0.01)
    ckpt = estimate_memory(mc, run_config(train={"activation_checkpointing": True}))
    assert ckpt.activations < big.activations / 3 and ckpt.peak < big.peak


def test_the_plan_walks_each_layer_windowed_layers_add_their_mask():
    mc, cfg = ModelConfig.from_dict(ARCH), run_config()  # fp32: SDPA keeps a float copy of each layer's mask
    base = estimate_memory(mc, cfg)
    windowed = estimate_memory(dataclasses.replace(mc, layer_sliding_windows=(None, 64) * 3), cfg)
    assert windowed.activations - base.activations == 3 * 256 * 256 * 4  # 3 windowed layers, [T, T] fp32
    post = estimate_memory(dataclasses.replace(mc, post_attn_norm=True, post_mlp_norm=True), cfg)
    assert post.activations > base.activations  # Block.walk's post-norms are counted
    # bf16 on CPU: up to 512 keys kernels.attention keeps [T, T] probabilities, beyond it takes SDPA (linear in T)
    mc = dataclasses.replace(mc, max_position_embeddings=1024)
    short, long = (estimate_memory(mc, run_config(train={"precision": "bf16"}, seq_len=T)).activations
                   for T in (384, 768))
    assert long < 2 * short


def test_grad_accumulation_keeps_grads_during_the_next_forward():
    mc = ModelConfig.from_dict(ARCH)
    one, two = (estimate_memory(mc, run_config(train={"grad_accum": k})) for k in (1, 2))
    assert two.peak == one.peak + one.grads


def test_bad_world_size_and_device_are_config_errors():
    mc, cfg = ModelConfig.from_dict(ARCH), run_config()
    with pytest.raises(ConfigError, match="--nproc: expected an integer >= 1, got 0"):
        estimate_memory(mc, cfg, world_size=0)
    with pytest.raises(ConfigError, match="device: expected 'cpu' or 'cuda'"):
        estimate_memory(mc, cfg, device="tpu")


def test_a_hub_id_on_an_unreachable_hub_fails_fast_like_every_cli(monkeypatch, tmp_path):
    """One resolver (engine.model.hf_format.resolve_model_dir): no retries with backoff (it took 25 s)."""
    import time

    from engine.model.hf_format import WeightsError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    raw = run_dict(lora={"rank": 4})
    raw["model"]["from_pretrained"] = "nobody/no-such-model"
    start = time.monotonic()
    with pytest.raises(WeightsError, match="the hub at http://127.0.0.1:9 is unreachable"):
        plan_model_config(from_dict(RunConfig, raw, where=""))
    assert time.monotonic() - start < 3


def _pretrained_dir(tmp_path) -> Path:
    """A model directory holding config.json alone: the planner never reads weights."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_to_hf(ModelConfig.from_dict(ARCH))))
    return d


def test_model_config_comes_from_config_json_or_the_architecture(tmp_path):
    raw = run_dict(lora={"rank": 4})
    raw["model"]["from_pretrained"] = str(_pretrained_dir(tmp_path))
    mc = plan_model_config(from_dict(RunConfig, raw, where=""))
    assert (mc.vocab_size, mc.hidden_size, mc.num_layers) == (8192, 256, 6)
    scratch = {"architecture": {k: v for k, v in ARCH.items() if k != "vocab_size"}, "bpe_vocab_size": 4096}
    assert plan_model_config(from_dict(RunConfig, {**run_dict(), "model": scratch}, where="")).vocab_size == 4096
    with pytest.raises(ConfigError, match="data.seq_len: 4096 exceeds the model's max_position_embeddings 512"):
        plan_model_config(run_config(seq_len=4096))


# ---------------------------------------------------------------------------- python -m cli.plan


def _plan(capsys, *argv):
    from cli.plan import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_cli_prints_the_table_and_the_savings(capsys):
    code, out, err = _plan(capsys, str(ROOT / "configs" / "quickstart.json"), "--device", "cpu")
    assert code == 0, err
    for row in ("weights", "grads", "optimizer state", "activations", "workspace", "LM head + loss", "peak per rank"):
        assert row in out
    assert "LoRA: not applicable" in out
    assert "FSDP vs DDP: nothing to shard in one process; at --nproc 4" in out
    # fitting depends on this machine's free RAM, the table does not: either it fits, or it warns on stderr
    assert "the plan needs" in out and (": fits" in out) == (err == "") == ("exceeds the available RAM" not in err)


def test_cli_lora_run_compares_with_full_fine_tuning(tmp_path, capsys):
    raw = run_dict(train={"precision": "bf16"}, lora={"rank": 8})
    raw["model"]["from_pretrained"] = str(_pretrained_dir(tmp_path))
    config = tmp_path / "lora.json"
    config.write_text(json.dumps(raw))
    code, out, _ = _plan(capsys, str(config), "--nproc", "2", "--device", "cpu")
    assert code == 0
    assert "LoRA: r=8 on q_proj,k_proj,v_proj,o_proj" in out and "full fine-tuning would need" in out
    assert "FSDP vs DDP: at 2 ranks" in out and "FSDP shards the frozen base too" in out and "2 ranks (ddp)" in out
    assert "block cache" not in out  # a dense base: no CPU block cache (engine/quant/heap.py)


def test_cli_names_the_block_cache_of_a_quantized_base_among_what_it_does_not_count(tmp_path, capsys):
    raw = run_dict(train={"precision": "bf16"}, lora={"rank": 8, "base_dtype": "nf4"})
    raw["model"]["from_pretrained"] = str(_pretrained_dir(tmp_path))
    config = tmp_path / "qlora.json"
    config.write_text(json.dumps(raw))
    code, out, _ = _plan(capsys, str(config), "--device", "cpu")
    assert code == 0 and "CPU block cache keeps up to 40.0 MiB of freed blocks" in out, out


def test_cli_fsdp_at_n_ranks(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(run_dict()))
    code, out, _ = _plan(capsys, str(config), "--nproc", "4", "--set", "distributed.strategy=fsdp", "--device", "cpu")
    assert code == 0 and "4 ranks (fsdp)" in out and "1/4 shard" in out
    assert "FSDP vs DDP: at 4 ranks" in out


def test_cli_warns_when_the_peak_exceeds_available_memory(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(run_dict(train={"batch_size": 100_000})))  # ~2 TB of activations
    code, out, err = _plan(capsys, str(config), "--device", "cpu")
    assert code == 0 and "peak per rank" in out
    assert "cli.plan: warning: the estimated peak" in err and "exceeds the available RAM" in err


@pytest.mark.parametrize("argv,message", [
    (["missing.json"], "missing.json: config file not found"),
    (["configs/quickstart.json", "--nproc", "0"], "--nproc: expected an integer >= 1, got 0"),
    (["configs/quickstart.json", "--set", "data.seq_len=4096"], "data.seq_len: 4096 exceeds"),
])
def test_cli_user_errors_exit_2_without_traceback(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(ROOT)
    code, _, err = _plan(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "cli.plan", "configs/quickstart.json", "--device", "cpu"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "peak per rank" in result.stdout


if __name__ == "__main__":  # the measuring subprocess of `measured`
    print(json.dumps(measure(json.loads(sys.argv[1]))))
