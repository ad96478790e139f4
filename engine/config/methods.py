"""The sections of the preference and RL objectives (`dpo.*`, `grpo.*`); RunConfig (run.py) holds them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from engine.config.parsing import ConfigError, _check_int


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")  # no reference model: nothing to disable, copy or precompute


@dataclass(frozen=True)
class DPOConfig:
    """Preference optimization (`dpo.*`, with train.objective "dpo"); formulas in engine/train/dpo.py.

    The reference (sigmoid/ipo/hinge): a LoRA run's own base (adapters disabled, no second copy of the weights);
    full fine-tuning: a frozen copy of model.from_pretrained in ref_dtype, or with precompute_ref its log-probs,
    computed in one pass before training and cached under data.processed_dir (no reference held while training).
    """

    loss: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = "sigmoid"  # sigmoid = DPO; simpo/orpo: no reference
    beta: float = 0.1  # DPO/IPO/hinge/SimPO temperature; ORPO's odds-ratio weight (lambda)
    label_smoothing: float = 0.0  # cDPO: the probability a label is flipped (sigmoid and simpo)
    gamma: float = 0.5  # SimPO's target reward margin (TRL's simpo_gamma)
    precompute_ref: bool = False  # reference log-probs computed once before training, then read from the batch
    ref_dtype: Literal["fp32", "bf16"] = "fp32"  # the frozen reference copy of a full fine-tuning run

    def __post_init__(self):
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"dpo.loss: expected one of {DPO_LOSSES}, got {self.loss!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ConfigError(f"dpo.beta: expected a positive number, got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing: expected a number in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
            raise ConfigError(f"dpo.label_smoothing: applies to the sigmoid and simpo losses, not {self.loss!r}")
        if self.ref_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"dpo.ref_dtype: expected 'fp32' or 'bf16', got {self.ref_dtype!r}")
        if self.precompute_ref and self.loss in REFERENCE_FREE_LOSSES:
            raise ConfigError(f"dpo.precompute_ref: the {self.loss!r} loss uses no reference model")

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE_LOSSES


@dataclass(frozen=True)
class GRPOConfig:
    """Group Relative Policy Optimization (`grpo.*`, with train.objective "grpo"); see engine/train/grpo.py.

    Each optimizer step samples `num_generations` completions for each of its prompts (train.batch_size prompts
    per micro-batch) with the model being trained, scores them with `rewards`, and takes the clipped-ratio
    policy-gradient step on group-normalized advantages (TRL GRPOTrainer's formulas and names).
    """

    rewards: tuple[str, ...] = ("exact_match",)  # built-ins "exact_match", "format", or "module:function"
    reward_weights: Optional[tuple[float, ...]] = None  # one per reward; default all 1
    answer_field: str = "answer"  # the row field exact_match compares the completion's final answer with
    format_pattern: str = r"^\s*-?\d+(\.\d+)?\s*$"  # the regex the "format" reward looks for (re.search, DOTALL)
    num_generations: int = 8  # G completions per prompt (the group); 1 is refused: every advantage would be 0
    max_completion_length: int = 64  # generated tokens per completion at most (also dr_grpo's normalizer)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    # "grpo": mean over each completion's tokens, then over completions; "dapo": over all completion tokens of the
    # step; "dr_grpo": the step's token sum / (completions x max_completion_length)
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    epsilon: float = 0.2  # ratio clip: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = None  # default: epsilon (DAPO's clip-higher sets it larger)
    beta: float = 0.0  # KL(policy || reference) weight (k3 estimator); 0: no reference pass at all
    use_bias_correction_kl: bool = True  # the KL term times the policy ratio (off-policy correction; TRL's default)
    num_iterations: int = 1  # optimizer steps per generation (old log-probs from the sampling policy when > 1)
    scale_rewards: Literal["group", "batch", "none"] = "group"  # advantage / std over the group, the step, or not
    eval_max_prompts: int = 64  # held-out prompts (data.val) scored greedily before and after training by cli.train

    def __post_init__(self):
        for name in ("rewards", "reward_weights"):
            value = getattr(self, name)
            if isinstance(value, (list, str)):
                object.__setattr__(self, name, tuple(value) if isinstance(value, list) else (value,))
        if not self.rewards or not all(isinstance(r, str) and r for r in self.rewards):
            raise ConfigError(f"grpo.rewards: expected a list of reward names, got {self.rewards!r}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"grpo.reward_weights: {len(self.reward_weights)} weights for {len(self.rewards)} "
                              f"rewards; give one per reward")
        if self.num_generations == 1:
            raise ConfigError("grpo.num_generations: 1 completion per prompt makes every group-normalized "
                              "advantage 0 (no gradient); use at least 2")
        for name in ("num_generations", "max_completion_length", "num_iterations", "eval_max_prompts"):
            _check_int(f"grpo.{name}", getattr(self, name), minimum=1)
        if self.top_k is not None:
            _check_int("grpo.top_k", self.top_k, minimum=1)
        if not self.temperature > 0:
            raise ConfigError(f"grpo.temperature: expected a positive number (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"grpo.top_p: expected a number in (0, 1], got {self.top_p}")
        for name in ("epsilon", "epsilon_high", "beta"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"grpo.{name}: expected a number >= 0, got {value}")
        choices = {"loss_type": ("grpo", "dapo", "dr_grpo"), "scale_rewards": ("group", "batch", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"grpo.{name}: expected one of {allowed}, got {getattr(self, name)!r}")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
