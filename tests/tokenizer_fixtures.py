"""Tiny Hugging Face style tokenizer dirs for tests, trained in-process (no hub access needed)."""
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today? I'm fine, thanks.",
    "def train_step(model, batch):\n    return model(batch).loss\n",
    "Numbers: 0 1 2 3 42 1234567890, and punctuation ;:'\"()[]{}",
    "Fine-tuning large language models is fun; tokenizers matter.",
    "Café naïve résumé — über straße 東京 日本語 こんにちは",
] * 4

# Qwen2's pre-tokenizer regex: isolates digits one by one and keeps newlines apart.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2's template as published: writes bos_token text itself and rejects non-alternating roles.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _byte_level(pre_tokenizer, specials, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _gpt2():
    tok = _byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"], 400)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    return tok, {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, **specials}


def _qwen():
    split = pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _byte_level(pre_tokenizers.Sequence([split, byte_level]), specials, 420)
    tok.normalizer = normalizers.NFC()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHATML_TEMPLATE,
    }
    return tok, config


def _llama(legacy=False):
    """SentencePiece-style BPE: '▁' for spaces, byte fallback, and a TemplateProcessing that adds <s>.

    legacy=False is the current Llama/Mistral tokenizer.json layout (a Metaspace pre-tokenizer), which transformers'
    LlamaTokenizer also builds for itself; legacy=True is Llama-2's published one (Prepend + Replace normalizer).
    """
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = metaspace
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300))
    learned = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    as_dict = lambda t: {"__type": "AddedToken", "content": t, "lstrip": False, "normalized": False,
                         "rstrip": False, "single_word": False}  # fmt: skip
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": as_dict("<s>"),
        "eos_token": as_dict("</s>"),
        "unk_token": as_dict("<unk>"),
        "pad_token": None,
        "legacy": False,
        "chat_template": LLAMA2_TEMPLATE,
    }
    return tok, config


STYLES = {"gpt2": _gpt2, "qwen": _qwen, "llama": _llama, "llama_legacy": lambda: _llama(legacy=True)}


def write_tokenizer_dir(path, style="llama", chat_template=..., **config_overrides) -> Path:
    """Write tokenizer.json + tokenizer_config.json for a tiny tokenizer of `style` into `path`.

    chat_template: leave out for the style's own template, None to drop it, or a str / list of named templates.
    config_overrides: tokenizer_config.json keys to set (a value of None is written as JSON null).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok, config = STYLES[style]()
    if chat_template is not ...:
        config["chat_template"] = chat_template
    config.update(config_overrides)
    config = {k: v for k, v in config.items() if not (k == "chat_template" and v is None)}
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return path
