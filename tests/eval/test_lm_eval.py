"""The engine as an lm-eval LM against lm-eval's own `hf` backend on the same tiny transformers-written model:
the same log-likelihoods (<= 1e-4), the same generations and the same metrics, on tasks defined here over local
jsonl files (no Hub)."""
import json
import math
from pathlib import Path

import datasets
import pytest

from cli.common import load_for_inference
from engine.config import ConfigError
from engine.eval.lm_eval_model import EngineLM, metrics_of, run_tasks, task_manager
from tests.hf_models import save_demo_model

WORDS = "the cat sat on a mat while two dogs ran past the old red barn and one bird sang".split()
TASKS = ["tiny_mc", "tiny_ll", "tiny_ppl", "tiny_gen"]


def _yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


def write_tasks(root: Path) -> Path:
    """Four tasks, one per request type (multiple choice, loglikelihood, rolling, generation), over jsonl files."""
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    mc = [{"question": f"Which word follows '{WORDS[i]}'?", "choices": [WORDS[i + 1], WORDS[i + 2], "zebra"],
           "answer": i % 3} for i in range(8)]
    ll = [{"context": " ".join(WORDS[i:i + 4]) + (" " if i % 2 else ""), "target": WORDS[i + 4]} for i in range(6)]
    ll.append({"context": "", "target": "cat"})  # an empty context: scored after the prefix token
    ppl = [{"text": " ".join(WORDS[(i * 3) % 7:]) * (1 + 4 * (i == 0))} for i in range(4)]  # doc 0 > 128 tokens
    gen = [{"q": f"Say {w}:", "a": w} for w in WORDS[:5]]
    for name, rows in (("mc", mc), ("ll", ll), ("ppl", ppl), ("gen", gen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_mc.yaml").write_text(_yaml("tiny_mc", root / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
    (tasks / "tiny_ll.yaml").write_text(_yaml("tiny_ll", root / "ll.jsonl", (
        "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n")))
    (tasks / "tiny_ppl.yaml").write_text(_yaml("tiny_ppl", root / "ppl.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")))
    (tasks / "tiny_gen.yaml").write_text(_yaml("tiny_gen", root / "gen.jsonl", (
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    save_demo_model(root / "model")
    return root / "model", write_tasks(root)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _responses(results) -> dict:
    """{(task, doc_id): [per-request response]} from log_samples."""
    return {(task, s["doc_id"]): [r[0] for r in s["resps"]] for task, samples in results["samples"].items()
            for s in samples}


def test_engine_lm_matches_lm_evals_hf_backend(setup):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model_dir, tasks = setup
    model, tokenizer = load_for_inference(model_dir)
    ours = run_tasks(EngineLM(model, tokenizer, batch_size=3), TASKS, include_path=tasks, bootstrap_iters=0,
                     log_samples=True)
    hf = HFLM(pretrained=str(model_dir), batch_size=3, device="cpu", dtype="float32")
    theirs = simple_evaluate(model=hf, tasks=TASKS, task_manager=task_manager(TASKS, tasks), bootstrap_iters=0,
                             log_samples=True)
    a, b = _responses(ours), _responses(theirs)
    assert a.keys() == b.keys() and len(a) == 8 + 7 + 4 + 5
    n_scores = 0
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            if isinstance(x, str):  # generate_until
                assert x == y, key
            else:
                x = (x,) if isinstance(x, float) else x  # rolling: a float; else (log-likelihood, greedy)
                y = (y,) if isinstance(y, float) else y
                assert abs(x[0] - y[0]) <= 1e-4, (key, x, y)
                assert tuple(x[1:]) == tuple(y[1:]), key
                n_scores += 1
    assert n_scores == 8 * 3 + 7 + 4
    ours_m, theirs_m = metrics_of(ours), metrics_of(theirs)
    assert ours_m.keys() == theirs_m.keys() and "tiny_mc/acc" in ours_m and "tiny_gen/exact_match" in ours_m
    for name, value in ours_m.items():
        assert math.isclose(value, theirs_m[name], rel_tol=1e-5, abs_tol=1e-7), (name, value, theirs_m[name])


def test_rolling_windows_cover_a_text_longer_than_the_context(setup):
    model_dir, _ = setup
    model, tokenizer = load_for_inference(model_dir)
    text = " ".join(WORDS) * 6
    assert len(tokenizer.encode(text)) > 2 * model.config.max_position_embeddings
    short = EngineLM(model, tokenizer, max_length=32)

    class Req:
        args = (text,)

    (windowed,) = short.loglikelihood_rolling([Req()])
    (longer,) = EngineLM(model, tokenizer).loglikelihood_rolling([Req()])  # windows of 128 tokens
    assert windowed < 0 and longer < 0 and windowed != longer  # less context per token: a different score
    with pytest.raises(ConfigError, match="max_length: expected 1..128"):
        EngineLM(model, tokenizer, max_length=4096)


def test_unknown_tasks_and_bad_include_paths_are_config_errors(setup, tmp_path):
    _, tasks = setup
    with pytest.raises(ConfigError, match=r"--include-path: .*missing: no such file or directory"):
        task_manager(["tiny_mc"], tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"lm-eval task 'tiny_mcq' does not exist \(did you mean 'tiny_mc'"):
        task_manager(["tiny_mcq"], tasks)
