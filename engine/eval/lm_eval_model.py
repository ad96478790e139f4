"""The engine's model as an lm-evaluation-harness `LM`, and `run_tasks` to evaluate it on lm-eval tasks.

EngineLM follows lm-eval's own `hf` backend (HFLM) request by request, so the two score a model identically:
  loglikelihood          TemplateLM's encoding (trailing context spaces move to the continuation; the pair is
                         tokenized whole and split at the context's length; an empty context is the prefix token,
                         BOS else EOS); each input is (context + continuation)[-(max_length + 1):][:-1]; the sum of
                         the continuation's log-probs and whether greedy decoding gives it. Requests are sorted by
                         length (longest first) and scored `batch_size` at a time, right-padded: with a causal mask
                         padding after a sequence does not change its logits. Logits are computed only for the
                         continuation's positions, a row at a time (memory: one row's len(continuation) x vocab).
  loglikelihood_rolling  lm-eval's disjoint rolling windows of max_length tokens, each scored as above.
  generate_until         greedy or sampled decoding with the KV cache (engine.infer.generate.generate_stream),
                         contexts left-truncated to max_length - max_gen_toks; text is cut at the first stop
                         string (`until`, plus the EOS text), as HFLM does. Requests with the same prompt length and
                         generation settings decode together, `batch_size` at a time; decoding stops once every row
                         has met a stop string or EOS.
Tokenization is the engine's Tokenizer with HFLM's defaults: the tokenizer's special tokens are added (e.g. BOS)
unless the text already starts with the prefix token's text.
lm-eval is an optional extra (`pip install -e ".[eval]"`); this module imports it, so import it only to evaluate.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from engine.config import ConfigError
from engine.infer.generate import generate_stream

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the caller (cli.eval, the training loop) turns this into a one-line error
    raise ImportError(f'lm-evaluation-harness is needed to evaluate on lm-eval tasks: pip install -e ".[eval]" '
                      f"({e})") from None

logger = logging.getLogger("engine.eval.lm_eval_model")
__all__ = ["EngineLM", "metrics_of", "run_tasks", "task_manager"]


class EngineLM(TemplateLM):
    """An engine Transformer + Tokenizer as an lm-eval LM; `batch_size` sequences per forward pass."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, seed: int = 1234):
        super().__init__()
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer {tokenizer.source}: lm-eval needs an eos_token (the end-of-text token)")
        self.model, self.tokenizer, self._batch_size = model, tokenizer, int(batch_size)
        limit = model.config.max_position_embeddings
        if max_length is not None and not 0 < max_length <= limit:
            raise ConfigError(f"max_length: expected 1..{limit} (the model's max_position_embeddings), got {max_length}")
        self._max_length = max_length or limit
        self._max_gen_toks, self._seed = max_gen_toks, seed
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # HFLM: BOS, else EOS
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """Token ids; None: the tokenizer's special tokens, unless `string` already starts with the prefix token."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode([self.prefix_token_id]))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def _score(self, inputs: list[list[int]], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), greedy?) for each input whose last len(cont) targets are `cont`."""
        T = max(map(len, inputs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        x = torch.full((len(inputs), T), pad, dtype=torch.long)
        for b, ids in enumerate(inputs):
            x[b, :len(ids)] = torch.tensor(ids)
        h = self.model.hidden_states(x.to(self.device))  # (B, T, C)
        out = []
        for b, (ids, cont) in enumerate(zip(inputs, conts)):
            n = len(ids)
            # logits of the continuation's positions only, one row at a time: never (B, T, V) at once
            logp = F.log_softmax(self.model.lm_head(h[b, n - len(cont):n]).float(), dim=-1)  # (len(cont), V)
            target = torch.tensor(cont, device=logp.device)
            greedy = bool((logp.argmax(dim=-1) == target).all())
            out.append((float(logp.gather(-1, target[:, None]).sum()), greedy))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
        """requests [(key, context ids, continuation ids)] -> [(log-likelihood, greedy?)], in request order."""
        items = []
        for i, (_, context, cont) in enumerate(requests):
            if not cont:
                raise ValueError("lm-eval request with an empty continuation: nothing to score")
            inp = (context + cont)[-(self.max_length + 1):][:-1]
            items.append((i, inp, cont[-len(inp):] if len(cont) > len(inp) else cont))
        items.sort(key=lambda it: (-len(it[1]), it[0]))
        results: list = [None] * len(items)
        bs = override_bs or self.batch_size
        for start in range(0, len(items), bs):
            chunk = items[start:start + bs]
            for (i, _, _), res in zip(chunk, self._score([c[1] for c in chunk], [c[2] for c in chunk])):
                results[i] = res
                self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, over lm-eval's disjoint rolling windows of max_length tokens."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *window))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut at the first stop string; see the module doc."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = kwargs.pop("max_gen_toks")
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            key = (len(ids), max_gen, tuple(until), kwargs.get("temperature", 0.0) if kwargs.get("do_sample")
                   else 0.0, kwargs.get("top_k"), kwargs.get("top_p"))
            groups.setdefault(key, []).append((i, ids))
        out: list = [None] * len(requests)
        for (_, max_gen, until, temperature, top_k, top_p), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                texts = self._generate([ids for _, ids in chunk], max_gen, list(until), temperature, top_k, top_p)
                for (i, _), text in zip(chunk, texts):
                    out[i] = postprocess_generated_text(text, list(until), None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _generate(self, prompts, max_gen: int, until: list[str], temperature, top_k, top_p) -> list[str]:
        """Decode equal-length prompts together until each text holds a stop string (or max_gen tokens)."""
        x = torch.tensor(prompts, dtype=torch.long, device=self.device)
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        eos = self.eot_token_id
        for step in generate_stream(self.model, x, max_gen, temperature=temperature, top_k=top_k, top_p=top_p,
                                    eos_token_id=eos, seed=self._seed if temperature else None):
            for b, t in enumerate(step.tolist()):
                if not done[b]:
                    new[b].append(t)
                    done[b] = t == eos or any(s and s in self.tok_decode(new[b]) for s in until)
            if all(done):
                break
        return [self.tok_decode(ids) for ids in new]


def task_manager(tasks: Sequence[str], include_path):
    """A TaskManager that knows every name in `tasks`; the built-in index (slow: ~15k task files) is built only
    when include_path lacks one. An unknown name is a ConfigError naming the close matches."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path):
            if not Path(p).exists():
                raise ConfigError(f"--include-path: {p}: no such file or directory (expected a dir of lm-eval task "
                                  "YAML files)")
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if len(manager.match_tasks(list(tasks))) == len(tasks):
            return manager
    manager = TaskManager(include_path=include_path)
    for name in tasks:
        if not manager.match_tasks([name]):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise ConfigError(f"lm-eval task {name!r} does not exist" + (
                f" (did you mean {', '.join(map(repr, close))}?)" if close else
                "; list them with `lm-eval ls tasks`, or define one in a YAML file under --include-path"))
    return manager


def run_tasks(lm: EngineLM, tasks: Sequence[str], *, num_fewshot: Optional[int] = None, limit=None,
              include_path=None, manager=None, bootstrap_iters: int = 100000, log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate on `tasks` with `lm`: its results dict ("results": {task: {"acc,none": ...}}).
    `manager` (from task_manager(tasks, include_path)) saves indexing the task files again."""
    from lm_eval import simple_evaluate

    if not tasks:
        raise ConfigError("lm-eval: no task names given")
    manager = manager or task_manager(tasks, include_path)
    was_training = lm.model.training
    lm.model.eval()
    try:
        return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                               task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    finally:
        lm.model.train(was_training)


def metrics_of(results: dict) -> dict[str, float]:
    """{"task/metric": value} of the numbers in a results dict ("acc,none" -> "acc"; stderr left out)."""
    out = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric:
                out[f"{task}/{metric}" + (f"[{filt}]" if filt not in ("", "none") else "")] = float(value)
    return out
