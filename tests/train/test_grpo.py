"""GRPO in the loop: advantages, exact accumulation, a run that raises its reward, bitwise resume, bad input.

The loss formulas themselves are checked against TRL in test_grpo_trl.py.
"""
import dataclasses
import json

import pytest
import torch

from engine.config import ConfigError, RunConfig, from_dict
from engine.config.run import GRPOConfig
from engine.data.documents import DataError
from engine.data.prompts import read_prompts
from engine.data.tokenizer import Tokenizer
from engine.model.transformer import Transformer
from engine.train.grpo import GRPO, group_advantages
from engine.train.loop import train
from engine.train.rewards import RewardError, final_answer, resolve_rewards, score
from engine.train.rollouts import pack, sample, stop_ids
from engine.train.step import train_step
from tests.hf_models import save_demo_model


def short(prompts, completions, **fields):
    """A reward the tiny random model can learn in a few steps: end the completion early."""
    return [-float(len(c)) for c in completions]


def vowels(prompts, completions, **fields):
    """Another learnable one: the fraction of vowels among the completion's characters."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def not_a_number(prompts, completions, **fields):
    return ["high"] * len(completions)


def nan_reward(prompts, completions, **fields):
    return [float("nan")] * len(completions)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo_model")
    save_demo_model(d)
    return d


def _prompts_file(path, n=12):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{i} plus {i}", "answer": str(2 * i)}) + "\n")
    return path


def _run_cfg(tmp_path, model_dir, **grpo) -> RunConfig:
    return from_dict(RunConfig, _run_dict(tmp_path, model_dir, **grpo), where="")


def _run_dict(tmp_path, model_dir, **grpo) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return {
        "model": {"from_pretrained": str(model_dir)},
        "data": {"train": str(_prompts_file(tmp_path / "p.jsonl")), "format": "prompts", "seq_len": 16},
        "train": {"objective": "grpo", "batch_size": 2, "grad_accum": 2, "max_steps": 6, "lr": 3e-2,
                  "warmup_steps": 0, "schedule": "constant", "eval_every": 0, "save_every": 2, "seed": 0,
                  "weight_decay": 0.0},
        "grpo": {"rewards": ["tests.train.test_grpo:short"], "num_generations": 4, "max_completion_length": 8,
                 **grpo},
        "out_dir": str(tmp_path / "run")}


def test_group_advantages_are_trls_formula():
    from trl.trainer.utils import nanstd

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, -1.0, 3.0, 0.0])
    g = r.view(-1, 4)
    mean = g.mean(1).repeat_interleave(4)
    torch.testing.assert_close(group_advantages(r, 4, "group"),
                               (r - mean) / (nanstd(g, dim=1).repeat_interleave(4) + 1e-4))
    torch.testing.assert_close(group_advantages(r, 4, "batch"), (r - mean) / (nanstd(r) + 1e-4))
    torch.testing.assert_close(group_advantages(r, 4, "none"), r - mean)
    assert group_advantages(r, 4)[4:8].abs().max() == 0  # a group of equal rewards teaches nothing


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_k_micro_batches_of_b_equal_one_batch_of_kb(model_dir, loss_type):
    """Two micro-batches of 2 groups (different completion lengths and paddings) step exactly like one of 4."""
    tok = Tokenizer.from_pretrained(model_dir)
    cfg = GRPOConfig(num_generations=2, max_completion_length=6, loss_type=loss_type)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (4, 6, 5, 3)]
    completions = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (6, 1, 3, 6, 2, 5, 4, 6)]
    adv = torch.randn(8, generator=g)
    whole = dict(pack(prompts, completions, 2), advantages=adv)
    halves = [dict(pack(prompts[i:i + 2], completions[2 * i:2 * i + 4], 2), advantages=adv[2 * i:2 * i + 4])
              for i in (0, 2)]
    params = []
    for batches in ([whole], halves):
        torch.manual_seed(0)
        model = Transformer.from_pretrained(model_dir)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        out = train_step(model, opt, batches, device=torch.device("cpu"), loss_module=GRPO(model, tok, cfg))
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert out["loss"] != 0.0


def test_sampling_is_seeded_and_stops_at_eos(model_dir):
    model, tok = Transformer.from_pretrained(model_dir), Tokenizer.from_pretrained(model_dir)
    eos = stop_ids(model, tok)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12]]
    a = sample(model, prompts, 3, 10, eos=eos, temperature=1.0, seed=1)
    assert a == sample(model, prompts, 3, 10, eos=eos, temperature=1.0, seed=1) != sample(
        model, prompts, 3, 10, eos=eos, temperature=1.0, seed=2)
    assert len(a) == 9 and all(0 < len(c) <= 10 and all(t not in eos for t in c[:-1]) for c in a)


def test_grpo_run_raises_its_reward(tmp_path, model_dir):
    cfg = _run_cfg(tmp_path, model_dir, rewards=["tests.train.test_grpo:vowels"], beta=0.05)
    result = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=10)), progress=False)
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward", "reward_std", "rewards/tests.train.test_grpo:vowels/mean", "completion_length",
                "gen_time_s", "gen_tokens_per_s", "train_time_s", "clip_ratio", "kl"):
        assert all(key in r for r in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at step 1
    first, last = (sum(r["reward"] for r in part) / 3 for part in (rows[:3], rows[-3:]))
    assert last > first + 0.05, (first, last)  # the fraction of vowels among the completions' characters


def test_num_iterations_reuses_each_generation(tmp_path, model_dir):
    cfg = _run_cfg(tmp_path, model_dir, num_iterations=2)
    result = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=4)), progress=False)
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 3]  # one generation per two steps
    assert rows[0]["clip_ratio"] == 0.0  # the first step of a generation is on-policy: ratio 1


def _interrupt_at(row, step):
    if row["step"] == step:
        raise KeyboardInterrupt


def test_resume_is_bitwise_exact(tmp_path, model_dir):
    straight = train(_run_cfg(tmp_path / "a", model_dir), progress=False)
    cfg = _run_cfg(tmp_path / "b", model_dir)
    first = train(cfg, progress=False, on_step=lambda row: _interrupt_at(row, 3))
    assert first.interrupted and first.step == 3
    resumed = train(dataclasses.replace(cfg, resume="auto"), progress=False)
    assert straight.losses == first.losses + resumed.losses  # exact float equality, step by step


def test_rewards_score_and_name_a_bad_function():
    assert final_answer("14 + 11 equals 25.") == "25" and final_answer("so #### 1,234") == "1234"
    assert final_answer("\\boxed{7} then 9") == "7"
    cfg = GRPOConfig(rewards=("exact_match", "format"), reward_weights=(1.0, 0.5))
    rows = [{"answer": "25"}, {"answer": 7}]
    out = score(resolve_rewards(cfg), ["a", "b"], ["14 + 11 = 25", " 7 "], rows)
    assert out.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    for name, message in (("tests.train.test_grpo:not_a_number", "value 0 is 'high'"),
                          ("tests.train.test_grpo:nan_reward", "NaN")):
        with pytest.raises(RewardError, match=message):
            score(resolve_rewards(GRPOConfig(rewards=(name,))), ["a"], ["b"], [{}])
    with pytest.raises(ConfigError, match="cannot import 'no_such_module:f'"):
        resolve_rewards(GRPOConfig(rewards=("no_such_module:f",)))
    with pytest.raises(ConfigError, match="neither a built-in"):
        resolve_rewards(GRPOConfig(rewards=("exactmatch",)))
    with pytest.raises(RewardError, match="no 'answer' field"):
        score(resolve_rewards(GRPOConfig()), ["a"], ["b"], [{}])


def test_config_refuses_a_group_of_one_and_mismatched_sections(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="grpo.num_generations: 1 completion per prompt"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ConfigError, match="grpo.reward_weights: 1 weights for 2 rewards"):
        GRPOConfig(rewards=("exact_match", "format"), reward_weights=(1.0,))
    raw = _run_dict(tmp_path, model_dir)
    raw["data"]["format"] = "text"
    with pytest.raises(ConfigError, match='set data.format "prompts"'):
        from_dict(RunConfig, raw, where="")


def test_prompt_lines_render_and_bad_lines_name_file_and_line(tmp_path, model_dir):
    tok = Tokenizer.from_pretrained(model_dir)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": 3}) + "\n"
                    + json.dumps({"prompt": "plain text"}) + "\n")
    chat, plain = read_prompts([str(good)], tok, max_len=64)
    assert list(chat.ids) == tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                     add_generation_prompt=True, tokenize=True)
    assert chat.fields == {"answer": 3} and list(plain.ids) == tok.encode("plain text")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"completion": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a 'prompt'"):
        read_prompts([str(bad)], tok, max_len=64)
