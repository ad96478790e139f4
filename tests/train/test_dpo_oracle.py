"""DPO against TRL 1.16 as the oracle: the same tiny transformers-written Llama, the same batch of pairs.

Loss and every gradient equal TRL's for each loss type we share: DPOTrainer.compute_loss for sigmoid, hinge and
ipo (policy != reference: the policy's weights are perturbed and saved as a second model), CPOTrainer
loss_type="simpo" (cpo_alpha=0, label smoothing 0.1) and ORPOTrainer (chosen sides of equal length, where TRL's
batch-token-mean NLL equals our per-pair mean) through their get_batch_loss_metrics.
Tolerances (fp32 on both sides; different summation orders): loss rtol 1e-5 / atol 1e-6, gradients rtol 1e-4 /
atol 1e-6 (relative to a gradient's scale).
"""
import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from engine import Transformer
from engine.config import DataConfig, DPOConfig, PreferenceConfig
from engine.data.preference import PreferencePairs, prepare_preference
from engine.data.tokenizer import Tokenizer, with_default_chat_template
from engine.model.hf_format import hf_state_dict
from engine.train.dpo import DPOLoss, frozen_reference
from tests.finetune_fixtures import pretrained_dir, write_jsonl

pytest.importorskip("trl")
logging.getLogger("transformers").setLevel(logging.ERROR)
BETA = 0.1

RECORDS = [  # completions of unequal lengths, so padding and the length normalizations are exercised
    {"prompt": "What is a cat?", "chosen": "An animal.", "rejected": "Well, a cat is, you know, an animal."},
    {"prompt": "Say hello", "chosen": "Hello!", "rejected": "Hi there, hello to you too, friend."},
    {"prompt": "Name a color", "chosen": "Blue, like the sky.", "rejected": "Red."},
]
# ORPO: TRL's NLL term averages over the batch's chosen tokens, prompt included; ours is each pair's mean over its
# completion (the paper's SFT term). Empty prompts (plain template: BOS completion EOS) and chosen sides of equal
# token counts make the two the same number.
EQUAL_CHOSEN = [
    {"prompt": "", "chosen": "Hello world", "rejected": "Hello there, my dear friend"},
    {"prompt": "", "chosen": "Hello there", "rejected": "cat"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(reference dir, policy dir): a tiny HF Llama, and the same one with perturbed weights."""
    import transformers

    tmp = tmp_path_factory.mktemp("dpo_oracle")
    ref_dir = pretrained_dir(tmp / "ref")
    policy = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    policy_dir = tmp / "policy"
    policy.save_pretrained(policy_dir)
    for f in ref_dir.iterdir():  # the tokenizer files
        if f.name.startswith(("tokenizer", "special")):
            (policy_dir / f.name).write_bytes(f.read_bytes())
    return ref_dir, policy_dir


def _pairs(tmp_path: Path, model_dir: Path, records, template: str = "auto") -> PreferencePairs:
    tokenizer = with_default_chat_template(Tokenizer.from_pretrained(model_dir))
    cfg = DataConfig(train=(str(write_jsonl(tmp_path / "p.jsonl", records)),), format="preference", seq_len=96,
                     val_fraction=0.0, processed_dir=str(tmp_path / "processed"),
                     preference=PreferenceConfig(template=template))
    return prepare_preference(cfg, tokenizer).train


def _split(ids, scored):
    """(prompt ids, completion ids) of one side: the completion starts at its first scored token."""
    first = int(scored.argmax())
    return ids[:first].tolist(), ids[first:].tolist()


def _trl_examples(pairs: PreferencePairs) -> list[dict]:
    out = []
    for c_ids, c_sup, r_ids, r_sup in pairs.pairs:
        (prompt, chosen), (prompt_r, rejected) = _split(c_ids, c_sup), _split(r_ids, r_sup)
        assert prompt == prompt_r  # both sides render the prompt identically
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out


def _ours(policy_dir, ref_dir, pairs, cfg: DPOConfig):
    """(loss per pair, grads under HF names) of our DPOLoss on all of `pairs` in one batch."""
    model = Transformer.from_pretrained(policy_dir).train()
    reference = "copy" if cfg.needs_reference else None
    ref = frozen_reference(str(ref_dir), torch.float32, "cpu") if reference else None
    objective = DPOLoss(model, cfg, reference=reference, ref_model=ref)
    batch = pairs._gather(range(len(pairs)))  # every pair in one batch
    loss_sum, metrics = objective(batch)
    loss = loss_sum / objective.units(batch)
    loss.backward()
    grads = hf_state_dict(model, {n: p.grad for n, p in model.named_parameters()})
    return loss.detach(), grads, metrics


def _hf_tokenizer(model_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def _dataset():
    import datasets

    return datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # unused: batches are ours


def _check(ours, theirs_loss, hf_model):
    loss, grads, _ = ours
    torch.testing.assert_close(loss, theirs_loss.detach().float(), rtol=1e-5, atol=1e-6)
    theirs = {n: p.grad for n, p in hf_model.named_parameters() if p.grad is not None}
    assert set(grads) <= set(theirs) | {"lm_head.weight"} and len(theirs) == len(grads)
    for name, g in grads.items():
        scale = float(theirs[name].abs().max()) + 1e-12
        torch.testing.assert_close(g / scale, theirs[name] / scale, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_and_gradients_equal_trl_dpotrainer(loss_type, models, tmp_path):
    import transformers
    from trl import DPOConfig as TRLConfig, DPOTrainer

    ref_dir, policy_dir = models
    pairs = _pairs(tmp_path, policy_dir, RECORDS)
    ours = _ours(policy_dir, ref_dir, pairs, DPOConfig(loss=loss_type, beta=BETA))

    policy = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    args = TRLConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=[loss_type], report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=len(pairs))
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=_hf_tokenizer(policy_dir),
                         train_dataset=_dataset())
    policy.train()
    loss = trainer.compute_loss(policy, trainer.data_collator(_trl_examples(pairs)))
    loss.backward()
    _check(ours, loss, policy)
    if loss_type == "sigmoid":  # and the logged metrics are TRL's (its own means over the batch)
        metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                     "logps/rejected"):
            assert ours[2][name] / len(pairs) == pytest.approx(metrics[name], rel=1e-4, abs=1e-5), name


def _cpo_batch(pairs: PreferencePairs) -> dict:
    """CPO/ORPO's tokenized batch (chosen_/rejected_ input_ids, attention_mask, labels: -100 on the prompt)."""
    batch = {}
    for k, side in ((0, "chosen"), (2, "rejected")):
        rows = [(p[k], p[k + 1]) for p in pairs.pairs]
        T = max(len(ids) for ids, _ in rows)
        ids_t = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        for i, (ids, sup) in enumerate(rows):
            ids_t[i, :len(ids)], mask[i, :len(ids)] = torch.from_numpy(ids), 1
            labels[i, :len(ids)] = torch.where(torch.from_numpy(sup), torch.from_numpy(ids), -100)
        batch.update({f"{side}_input_ids": ids_t, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def test_simpo_with_label_smoothing_equals_trl_cpotrainer(models, tmp_path):
    import transformers
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    _, policy_dir = models
    pairs = _pairs(tmp_path, policy_dir, RECORDS)
    cfg = DPOConfig(loss="simpo", beta=2.0, gamma=0.7, label_smoothing=0.1)
    ours = _ours(policy_dir, None, pairs, cfg)
    policy = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    args = CPOConfig(output_dir=str(tmp_path / "cpo"), loss_type="simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=0.0,
                     label_smoothing=0.1, report_to=[], use_cpu=True, bf16=False)
    trainer = CPOTrainer(model=policy, args=args, processing_class=_hf_tokenizer(policy_dir),
                         train_dataset=_dataset())
    policy.train()
    loss, _ = trainer.get_batch_loss_metrics(policy, _cpo_batch(pairs))
    loss.backward()
    _check(ours, loss, policy)


def test_orpo_equals_trl_orpotrainer(models, tmp_path):
    import transformers
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    _, policy_dir = models
    pairs = _pairs(tmp_path, policy_dir, EQUAL_CHOSEN, template="plain")
    assert len({int(p[1].sum()) for p in pairs.pairs}) == 1  # chosen completions of equal token counts
    ours = _ours(policy_dir, None, pairs, DPOConfig(loss="orpo", beta=0.25))
    policy = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    args = ORPOConfig(output_dir=str(tmp_path / "orpo"), beta=0.25, report_to=[], use_cpu=True, bf16=False)
    trainer = ORPOTrainer(model=policy, args=args, processing_class=_hf_tokenizer(policy_dir),
                          train_dataset=_dataset())
    policy.train()
    loss, _ = trainer.get_batch_loss_metrics(policy, _cpo_batch(pairs))
    loss.backward()
    _check(ours, loss, policy)


def test_cdpo_label_smoothing_is_the_conservative_dpo_formula(models, tmp_path):
    """TRL 1.16's DPOTrainer has no label smoothing in its sigmoid loss (CPOTrainer's sigmoid has it, without a
    reference): cDPO is checked against its formula, -(1-e) log s(beta d) - e log s(-beta d), on our own log-probs."""
    ref_dir, policy_dir = models
    pairs = _pairs(tmp_path, policy_dir, RECORDS)
    plain = _ours(policy_dir, ref_dir, pairs, DPOConfig(beta=BETA))
    smooth = _ours(policy_dir, ref_dir, pairs, DPOConfig(beta=BETA, label_smoothing=0.2))
    margin = torch.tensor(plain[2]["rewards/margins"] / len(pairs))  # beta * d, here the batch mean
    assert smooth[0] != plain[0]
    # per pair: plain = -log s(beta d); smoothed = 0.8 plain + 0.2 (plain + beta d) = plain + 0.2 beta d
    torch.testing.assert_close(smooth[0], plain[0] + 0.2 * margin, rtol=1e-5, atol=1e-6)
