"""Our GRPO loss against TRL's GRPOTrainer (the oracle) on hand-built inputs: the same tiny transformers model,
the same prompt and completion ids, masks, advantages, old and reference log-probs, for each loss
normalization TRL shares with us (grpo, dapo, dr_grpo), with and without the KL term and clipping.

Tolerance: fp32 throughout; loss rtol 1e-5 / atol 1e-6, gradients of the LM head rtol 1e-4 / atol 1e-6 (our
fused LM-head cross-entropy vs HF's full logits + log_softmax differ in summation order only).
"""
import pytest
import torch

from engine.config.run import GRPOConfig
from engine.data.sampler import IGNORE_INDEX
from engine.model.transformer import Transformer
from engine.train.grpo import grpo_loss_sum, grpo_token_loss, grpo_units
from engine.train.rollouts import completion_logps
from tests.hf_models import save_demo_model

pytest.importorskip("trl")

N, TP, TC, MAX_LEN, TEMPERATURE = 6, 5, 7, 8, 0.7


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(TRL's trainer over the HF model, our Transformer with the same weights); trl imports once per module."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig, GRPOTrainer

    d = tmp_path_factory.mktemp("grpo_trl")
    save_demo_model(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    args = TRLConfig(output_dir=str(d / "out"), per_device_train_batch_size=N, num_generations=3,
                     max_completion_length=MAX_LEN, temperature=TEMPERATURE, report_to=[], use_cpu=True,
                     bf16=False)  # TRL defaults to bf16 autocast; the parity is in fp32
    trainer = GRPOTrainer(model=hf, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["a b", "c d"]}), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop; one micro-batch here
    trainer.model.train()
    return trainer, Transformer.from_pretrained(d).train()


def _inputs(vocab: int, seed: int = 0) -> dict:
    """TRL's layout: prompt [N, TP] and completion [N, TC] ids with masks (completions of unequal lengths)."""
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.ones(N, TC, dtype=torch.long)
    for i, n in enumerate([7, 3, 5, 1, 7, 4]):
        completion_mask[i, n:] = 0
    return {"prompt_ids": torch.randint(0, vocab, (N, TP), generator=g),
            "prompt_mask": torch.ones(N, TP, dtype=torch.long),  # equal prompts: HF positions ignore the mask
            "completion_ids": torch.randint(0, vocab, (N, TC), generator=g), "completion_mask": completion_mask,
            "advantages": torch.randn(N, generator=g)}


def _ours(inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same rows in our rollout layout: ids [N, T], targets [N, T] (completion tokens at t = TP-1 ...)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, TP - 1:-1] = inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    return ids, targets, targets != IGNORE_INDEX


def _spread(per_completion: torch.Tensor) -> torch.Tensor:
    """TRL's [N, TC] per-token values at our [N, T] positions."""
    out = torch.zeros(N, TP + TC)
    out[:, TP - 1:-1] = per_completion
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta,off_policy,kl_correction", [(0.0, False, True), (0.0, True, True), (0.04, True, True),
                                                         (0.04, True, False)])
def test_grpo_loss_and_gradient_equal_trl(models, loss_type, beta, off_policy, kl_correction):
    trainer, ours = models
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.args.use_bias_correction_kl = kl_correction
    inputs = _inputs(ours.config.vocab_size)
    mask = inputs["completion_mask"]
    g = torch.Generator().manual_seed(1)
    # Old and reference log-probs near the policy's, so some ratios fall outside [0.8, 1.28] and get clipped
    with torch.no_grad():
        ids, targets, keep = _ours(inputs)
        now = completion_logps(ours, ids, targets, temperature=TEMPERATURE)[:, TP - 1:-1]
    old = now + 0.3 * torch.randn(N, TC, generator=g) if off_policy else None
    ref = now + 0.5 * torch.randn(N, TC, generator=g) if beta else None
    trl_inputs = dict(inputs, num_items_in_batch=mask.sum())
    if old is not None:
        trl_inputs["old_per_token_logps"] = old
    if ref is not None:
        trl_inputs["ref_per_token_logps"] = ref
    trainer.epsilon_low, trainer.epsilon_high = 0.2, 0.28
    trainer.model.zero_grad()
    trl_loss = trainer._compute_loss(trainer.model, trl_inputs)
    trl_loss.backward()

    ours.zero_grad()
    logps = completion_logps(ours, ids, targets, temperature=TEMPERATURE)
    maskf = keep.float()
    token_loss, stats = grpo_token_loss(logps, logps.detach() if old is None else _spread(old),
                                        None if ref is None else _spread(ref), inputs["advantages"], maskf,
                                        epsilon_low=0.2, epsilon_high=0.28, beta=beta, kl_correction=kl_correction)
    loss = grpo_loss_sum(token_loss, maskf, loss_type) / grpo_units(keep, loss_type, MAX_LEN)
    loss.backward()
    torch.testing.assert_close(loss, trl_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.output_weight.grad, trainer.model.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
    if off_policy:  # the inputs did exercise the clip
        assert 0 < float((stats["clipped"] * maskf).sum()) < float(maskf.sum())


def test_per_token_logps_equal_trl(models):
    trainer, ours = models
    inputs = _inputs(ours.config.vocab_size, seed=3)
    ids, targets, keep = _ours(inputs)
    with torch.no_grad():
        theirs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), TC)
        mine = completion_logps(ours, ids, targets, temperature=TEMPERATURE)[:, TP - 1:-1]
    mask = inputs["completion_mask"].bool()
    torch.testing.assert_close(mine[mask], theirs[mask], rtol=1e-5, atol=1e-5)


def test_config_defaults_are_trls():
    from trl import GRPOConfig as TRLConfig

    theirs, ours = TRLConfig(output_dir="unused", report_to=[], use_cpu=True), GRPOConfig()
    for name in ("loss_type", "epsilon", "epsilon_high", "beta", "num_iterations", "scale_rewards", "temperature",
                 "top_p", "use_bias_correction_kl"):
        assert getattr(ours, name) == getattr(theirs, name), name
