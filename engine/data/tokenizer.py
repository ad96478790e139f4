"""Tokenizer: a `tokenizers` fast tokenizer plus Hugging Face special tokens and chat templates.

Gives the same ids and text as transformers.AutoTokenizer (5.x) on a HF tokenizer dir, without importing it.
Rules taken from transformers: tokenizer.json's post-processor alone decides whether BOS/EOS are added (it drops
`add_bos_token`/`add_eos_token` from the config when tokenizer.json exists); special tokens named in the config
that tokenizer.json lacks are added as special tokens; chat templates render as in `_compile_template`.
"""
import copy
import json
import logging
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

logger = logging.getLogger("engine.data.tokenizer")

# Minimal ChatML whose end-of-turn marker is the tokenizer's own EOS: a model trained on it stops where
# generation stops (at EOS) with no extra stop token, and it fits any tokenizer that has an EOS. The
# `<|im_start|>` markers are plain text. Given to from-scratch BPE tokenizers and to SFT runs whose tokenizer
# has no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the tokens a chat template sees as variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may come under; templates read the first (Qwen3) or `thinking` (gpt-oss).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Config keys save_pretrained rewrites itself (or drops: tokenizer.json already holds the added tokens).
OWN_CONFIG_KEYS = {"tokenizer_class", "auto_map", "added_tokens_decoder", "chat_template", "add_bos_token",
                   "add_eos_token", "additional_special_tokens", "extra_special_tokens", "tokenizer_file",
                   "name_or_path", *SPECIAL_TOKEN_NAMES}  # fmt: skip


class TokenizerError(ValueError):
    """A tokenizer dir, file or chat template is missing or malformed."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: expected a JSON object, could not read it: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value, where: str) -> str | None:
    """A special token's text from a config value: a string, an AddedToken-style dict, or None; `where` names it."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f'{where}: expected a string or {{"content": ...}}, got {value!r}')


def _special_token_values(config: dict, where: str) -> tuple[dict, list]:
    """Named special tokens ({name: str or dict}) and the list of extra ones, validated, as transformers reads them."""
    # Model-specific string tokens (e.g. "image_token") and a dict of extra tokens are named tokens too.
    named = {k: v for k, v in config.items()
             if k in SPECIAL_TOKEN_NAMES or (k.endswith("_token") and isinstance(v, str))}  # fmt: skip
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        named, extra = {**named, **extra}, []
    if not isinstance(extra, list):
        raise TokenizerError(f"{where}: extra_special_tokens: expected a list or dict, got {type(extra).__name__}")
    for name, value in [*named.items(), *(("extra_special_tokens", v) for v in extra)]:
        _token_text(value, f"{where}: {name}")  # raises on a malformed value
    return {k: v for k, v in named.items() if v is not None}, [v for v in extra if v is not None]


def _added_token(value) -> AddedToken:
    # Plain strings become special, unnormalized tokens, as transformers' _post_init makes them.
    flags = {"normalized": False}
    if isinstance(value, dict):
        flags.update({k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value})
        value = value["content"]
    return AddedToken(value, special=True, **flags)


def _load_chat_templates(path: Path, config: dict) -> dict[str, str]:
    """Named chat templates; .jinja files in the dir win over tokenizer_config.json, as in transformers."""
    templates = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    for file in sorted((path / "chat_templates").glob("*.jinja")):
        templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    raw = config.get("chat_template")
    if raw is None or isinstance(raw, str):
        return {} if raw is None else {"default": raw}
    if isinstance(raw, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                     and isinstance(t.get("template"), str) for t in raw):  # fmt: skip
        return {t["name"]: t["template"] for t in raw}
    raise TokenizerError(f"{path / 'tokenizer_config.json'}: chat_template: expected a string or a list of "
                         f'{{"name": ..., "template": ...}}, got {type(raw).__name__}')  # fmt: skip


class _GenerationTag(Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (marks assistant text for loss masks); renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes <>&' and sorts keys; transformers (and so every template) uses plain dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    # Templates come from the Hub, so they are untrusted code: the immutable sandbox keeps them from mutating inputs.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _template_message(message, i: int) -> dict:
    if not isinstance(message, dict):
        raise TokenizerError(f"apply_chat_template: messages[{i}]: expected a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")  # fmt: skip
    # transformers drops None values (templates test `'key' in message`, and would print "None") ...
    message = {k: v for k, v in message.items() if v is not None}
    # ... and copies reasoning under both names templates read.
    reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


class Tokenizer:
    """Fast tokenizer with HF special tokens and chat templates; ids are python ints.

    Build it with from_pretrained(dir); the constructor configures the given `tokenizers.Tokenizer` in place.
    """

    def __init__(self, backend: Backend, config: dict | None = None, chat_templates: dict | None = None,
                 source: str = "<in memory>"):  # fmt: skip
        config, self.chat_templates, self.source = dict(config or {}), dict(chat_templates or {}), source
        if "pad_token" not in config and backend.padding:  # transformers takes it from tokenizer.json's padding
            config["pad_token"] = backend.padding["pad_token"]
        # transformers switches off padding/truncation baked into tokenizer.json on every call; we do it once.
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        named, extra = _special_token_values(config, f"{source}/tokenizer_config.json")
        self.special_tokens = {name: _token_text(value, name) for name, value in named.items()}
        self.extra_special_tokens = [_token_text(value, "extra_special_tokens") for value in extra]
        # Tokens already in tokenizer.json keep its flags; the rest are added, as transformers' _post_init does.
        existing = {t.content for t in backend.get_added_tokens_decoder().values()}
        new = {_token_text(v, ""): _added_token(v) for v in [*named.values(), *extra]}
        backend.add_special_tokens([token for text, token in new.items() if text not in existing])
        self._tok, self._config = backend, config
        # encode_batch_fast (tokenizers >= 0.20) skips offset bookkeeping that we never read.
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        # transformers skips this clean-up for BPE models, where it would delete real spaces.
        self._clean_up = bool(config.get("clean_up_tokenization_spaces")) and type(backend.model).__name__ != "BPE"

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """Load a HF tokenizer dir: tokenizer.json (required), tokenizer_config.json and chat templates."""
        path = Path(path)
        if path.suffix.lower() == ".gguf" or (path.is_dir() and not (path / "tokenizer.json").is_file()
                                               and any(path.glob("*.gguf"))):
            return cls.from_gguf(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: tokenizer directory not found (expected a dir holding tokenizer.json)")
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{tok_file}: not found; expected a `tokenizers` JSON file (sentencepiece-only "
                                 "dirs with just tokenizer.model are not supported)")  # fmt: skip
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise TokenizerError(f"{tok_file}: expected a `tokenizers` JSON file, could not load it: {e}") from e
        config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        if "added_tokens_decoder" not in config and (path / "special_tokens_map.json").is_file():
            # Older dirs: transformers lets special_tokens_map.json override the config's tokens.
            config.update(_read_json(path / "special_tokens_map.json"))
        return cls(backend, config, _load_chat_templates(path, config), source=str(path))

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """The tokenizer of a GGUF file (or of the one .gguf in a directory): tokenizer.ggml.* and its template."""
        from engine.data.gguf_tokenizer import backend_from_gguf, tokenizer_config_from_gguf
        from engine.model.gguf_read import gguf_file, metadata, open_gguf

        file = gguf_file(path)
        if file is None:
            raise TokenizerError(f"{path}: not a .gguf file")
        meta = metadata(open_gguf(file))
        backend = backend_from_gguf(meta, str(file))
        config, templates = tokenizer_config_from_gguf(meta)
        return cls(backend, config, templates, source=str(file))

    @property
    def backend(self) -> Backend:
        """The `tokenizers.Tokenizer` underneath (e.g. for writing it in another format)."""
        return self._tok

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={len(self)}, special_tokens={self.special_tokens})"

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding needs at least this many rows)."""
        return len(self)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None when it is not in the vocab."""
        return self._tok.token_to_id(token)

    def _special_id(self, name: str) -> int | None:
        return None if name not in self.special_tokens else self._tok.token_to_id(self.special_tokens[name])

    bos_token_id = property(lambda self: self._special_id("bos_token"), doc="BOS id, or None when there is none.")
    eos_token_id = property(lambda self: self._special_id("eos_token"), doc="EOS id, or None when there is none.")
    pad_token_id = property(lambda self: self._special_id("pad_token"), doc="Pad id, or None when there is none.")

    @property
    def add_bos_token(self) -> bool:
        """Whether encode(add_special_tokens=True) starts with BOS, as tokenizer.json's post-processor decides."""
        ids = self._tok.encode("").ids
        return self.bos_token_id is not None and ids[:1] == [self.bos_token_id]

    @property
    def add_eos_token(self) -> bool:
        """Whether encode(add_special_tokens=True) ends with EOS (a lone token counts once, as BOS if it is BOS)."""
        ids = self._tok.encode("").ids
        return self.eos_token_id is not None and len(ids) > self.add_bos_token and ids[-1] == self.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens applies tokenizer.json's post-processor (e.g. BOS)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[list[int]]:
        """encode() over many texts at once, on the library's thread pool."""
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (list, tuple or 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
                text = text.replace(a, b)
        return text

    def get_chat_template(self, chat_template: str | None = None, tools=None) -> str:
        """Template source: a named one, the given source itself, "tool_use" when tools are passed, or "default"."""
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if not self.chat_templates:
            raise TokenizerError(f"{self.source}: no chat template (expected `chat_template` in tokenizer_config.json"
                                 " or a chat_template.jinja file)")  # fmt: skip
        raise TokenizerError(f"{self.source}: several chat templates and none named 'default'; pass "
                             f"chat_template= one of {sorted(self.chat_templates)}")  # fmt: skip

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False,
                            chat_template: str | None = None, tools=None, documents=None, **kwargs):  # fmt: skip
        """Render messages ([{"role", "content"}, ...]) to text, or to ids (no special tokens added) if tokenize."""
        if not messages:
            raise TokenizerError("apply_chat_template: cannot render an empty conversation")
        template = _compile_template(self.get_chat_template(chat_template, tools))
        text = template.render(
            messages=[_template_message(m, i) for i, m in enumerate(messages)],
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs},  # caller's kwargs win, as in transformers
        )
        # The template already wrote any BOS text, so adding specials again would double it.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, path) -> Path:
        """Write tokenizer.json + tokenizer_config.json that this class and transformers both reload identically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        config = {k: v for k, v in self._config.items() if k not in OWN_CONFIG_KEYS and k not in self.special_tokens}
        # The generic class makes transformers use tokenizer.json as-is, as we do (its LlamaTokenizer, for one,
        # rebuilds the pre-tokenizer and decoder itself).
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.update(self.special_tokens, add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        if self.extra_special_tokens:
            config["extra_special_tokens"] = self.extra_special_tokens
        if list(self.chat_templates) == ["default"]:
            config["chat_template"] = self.chat_templates["default"]
        elif self.chat_templates:
            config["chat_template"] = [{"name": n, "template": t} for n, t in self.chat_templates.items()]
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")  # fmt: skip
        return path


def with_default_chat_template(tokenizer: "Tokenizer") -> "Tokenizer":
    """`tokenizer` itself if it has a chat template (or no EOS to end turns with), else a copy with
    DEFAULT_CHAT_TEMPLATE as its "default" template (save_pretrained writes it to tokenizer_config.json)."""
    if tokenizer.chat_templates or tokenizer.eos_token_id is None:
        return tokenizer
    logger.info("tokenizer %s has no chat template: using the minimal ChatML one (turns end with %r)",
                tokenizer.source, tokenizer.special_tokens["eos_token"])
    out = copy.copy(tokenizer)
    out.chat_templates = {"default": DEFAULT_CHAT_TEMPLATE}
    return out


class IncrementalDecoder:
    """Turn a stream of token ids into text pieces that are safe to print as they come.

    Decoding one token at a time breaks multi-byte characters and SentencePiece's leading spaces, so
    each step decodes a short window (from the last emitted boundary) and emits only the new suffix,
    holding it back while it ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a trailing incomplete character) at the end of a stream."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]
