"""Tokenizers to and from GGUF `tokenizer.ggml.*` metadata, built with the `tokenizers` library's own models.

Two kinds, as llama.cpp names them in `tokenizer.ggml.model`:
- `gpt2`: byte-level BPE (tokens already in the byte alphabet, merges "a b"); `tokenizer.ggml.pre` names the
  pre-tokenizer regexes (engine.model.gguf_names.PRE_TOKENIZERS, taken from llama.cpp's llama-vocab.cpp);
- `llama`: SentencePiece BPE (tokens with scores and types, `<0xXX>` byte tokens); merges, when the file has
  none, are recovered from the scores (a merge ranks as the score of the token it makes).
Special ids, add-BOS/EOS flags and the chat template come along, so engine.data.tokenizer.Tokenizer wraps it.
"""
from __future__ import annotations

import json
import logging

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from engine.model.gguf_names import BYTE, CONTROL, NORMAL, PRE_TOKENIZERS, UNKNOWN, USER_DEFINED

logger = logging.getLogger(__name__)
IGNORE_MERGES = ("llama-bpe",)  # Llama 3: a whole word in the vocab is taken as is (llama.cpp does too)
SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}


def _pre_tokenizer(pre: str):
    pieces = PRE_TOKENIZERS.get(pre)
    if pieces is None:
        logger.warning("tokenizer.ggml.pre '%s' is not one this engine knows (%s): splitting as GPT-2 does",
                       pre, ", ".join(PRE_TOKENIZERS))
        pieces = PRE_TOKENIZERS["gpt2"]
    steps = []
    for piece in pieces:
        if piece == "digits":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        elif piece == "gpt2":
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            steps += [pre_tokenizers.Split(Regex(piece), behavior="isolated"),
                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges a SentencePiece vocab implies: every split of a token into two vocab pieces, best score first."""
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, token in enumerate(tokens):
        if types[i] != NORMAL:
            continue
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in ids and right in ids:
                merges.append((-scores[i], ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def backend_from_gguf(meta: dict, source: str) -> Backend:
    """A `tokenizers.Tokenizer` from the tokenizer.ggml.* keys of `meta` (key -> value); errors name `source`."""
    from engine.data.tokenizer import TokenizerError

    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise TokenizerError(f"{source}: missing metadata key 'tokenizer.ggml.tokens'")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        tok = Backend(models.BPE(vocab, merges, ignore_merges=pre in IGNORE_MERGES))
        tok.pre_tokenizer = _pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":
        if "tokenizer.ggml.scores" not in meta and not merges:
            raise TokenizerError(f"{source}: missing metadata key 'tokenizer.ggml.scores' (a llama tokenizer "
                                 "without merges needs them)")
        merges = merges or _spm_merges(tokens, meta["tokenizer.ggml.scores"], types)
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        tok = Backend(models.BPE(vocab, merges, unk_token=None if unk is None else tokens[unk], fuse_unk=True,
                                 byte_fallback=True))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                     prepend_scheme="first" if prefix else "never")
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        add_bos_default = True
    else:
        raise TokenizerError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")
    # llama.cpp matches control and user-defined tokens whole in the text; only ids the vocab has are added.
    added = [AddedToken(t, special=ty == CONTROL, normalized=False) for t, ty in zip(tokens, types)
             if ty in (CONTROL, USER_DEFINED)]
    tok.add_tokens([a for a in added if not a.special])
    tok.add_special_tokens([a for a in added if a.special])
    _set_post_processor(tok, meta, tokens, add_bos_default)
    return tok


def _set_post_processor(tok: Backend, meta: dict, tokens: list[str], add_bos_default: bool) -> None:
    """BOS/EOS added by encode() as llama.cpp's tokenizer.ggml.add_bos_token / add_eos_token say."""
    single, specials = ["$A"], []
    for key, at_start in (("bos", True), ("eos", False)):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        wanted = meta.get(f"tokenizer.ggml.add_{key}_token", add_bos_default if key == "bos" else False)
        if token_id is None or not wanted:
            continue
        single = [tokens[token_id], *single] if at_start else [*single, tokens[token_id]]
        specials.append((tokens[token_id], token_id))
    if specials:
        tok.post_processor = processors.TemplateProcessing(single=" ".join(single), special_tokens=specials)


def tokenizer_config_from_gguf(meta: dict) -> tuple[dict, dict]:
    """(tokenizer_config-style special tokens, {"default": chat template} or {}) from the metadata."""
    tokens = meta["tokenizer.ggml.tokens"]
    config = {}
    for name, key in SPECIAL_IDS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    template = meta.get("tokenizer.chat_template")
    return config, ({"default": template} if template else {})


# ------------------------------------------------------------------------------------------- writing


def _pre_name(pre_tokenizer: dict | None) -> str:
    """The tokenizer.ggml.pre whose splitting equals this tokenizer.json pre-tokenizer (llama.cpp tells
    them apart by hashing a test string's tokens; the structure says the same here)."""
    for name in PRE_TOKENIZERS:
        probe = Backend(models.BPE())
        probe.pre_tokenizer = _pre_tokenizer(name)
        if _comparable(json.loads(probe.to_str())["pre_tokenizer"]) == _comparable(pre_tokenizer):
            return name
    logger.warning("the tokenizer's pre-tokenizer %s matches none llama.cpp names here; writing "
                   "tokenizer.ggml.pre 'gpt-2' (llama.cpp will split text as GPT-2 does)", json.dumps(pre_tokenizer))
    return "gpt-2"


def _comparable(pre):
    """A pre-tokenizer's JSON without the fields that never change ids (offset trimming)."""
    if isinstance(pre, dict):
        return {k: _comparable(v) for k, v in pre.items() if k != "trim_offsets"}
    if isinstance(pre, list):
        return [_comparable(v) for v in pre]
    return pre


def gguf_tokenizer_metadata(tokenizer) -> dict:
    """tokenizer.* metadata (key -> value) for an engine Tokenizer built on byte-level BPE or SentencePiece BPE."""
    from engine.data.tokenizer import TokenizerError

    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise TokenizerError(f"{tokenizer.source}: a {model.get('type')} tokenizer cannot be written to GGUF "
                             "(supported: BPE, byte-level or SentencePiece-style)")
    size = backend.get_vocab_size(with_added_tokens=True)
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    added = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    types = [(CONTROL if added[t].special else USER_DEFINED) if t in added else NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {"tokenizer.ggml.tokens": tokens}
    if model.get("byte_fallback"):  # SentencePiece: scores rank merges (a token's score: -rank of its merge)
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.scores"] = [-float(rank.get(t, 0)) for t in tokens]
        types = [BYTE if ty == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">") else ty
                 for t, ty in zip(tokens, types)]
        if model.get("unk_token") in tokens:
            types[tokens.index(model["unk_token"])] = UNKNOWN
        meta["tokenizer.ggml.add_space_prefix"] = "first" in json.dumps(spec.get("pre_tokenizer"))
    else:
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _pre_name(spec.get("pre_tokenizer"))
        meta["tokenizer.ggml.merges"] = merges
    meta["tokenizer.ggml.token_type"] = types
    for name, key in SPECIAL_IDS.items():
        token_id = tokenizer.token_to_id(tokenizer.special_tokens[name]) if name in tokenizer.special_tokens else None
        if token_id is not None:
            meta[f"tokenizer.ggml.{key}"] = token_id
    meta["tokenizer.ggml.add_bos_token"] = tokenizer.add_bos_token
    meta["tokenizer.ggml.add_eos_token"] = tokenizer.add_eos_token
    if "default" in tokenizer.chat_templates:
        meta["tokenizer.chat_template"] = tokenizer.chat_templates["default"]
    return meta
