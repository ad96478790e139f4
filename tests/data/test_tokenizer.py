"""engine.Tokenizer against transformers.AutoTokenizer (the oracle) on tiny tokenizers trained in-process."""
import json

import jinja2
import pytest
import tokenizers
import torch
from transformers import AutoTokenizer

from engine.data.tokenizer import Tokenizer, TokenizerError
from tests.tokenizer_fixtures import CHATML_TEMPLATE, write_tokenizer_dir

TEXTS = [
    "Hello world",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\n\n\nthen text",
    "multiple     spaces    between",
    "Café naïve résumé 東京 こんにちは",
    "emoji 🤗🚀 and a ZWJ family 👩‍👩‍👧",
    "never trained on: ʘ‿ʘ ∮ E⋅da = Q",
    "numbers 1234567890 and 3.14159",
    "def f(x):\n    return x ** 2\n",
    "special <s> and </s> and <|im_start|>user<|im_end|> and <|endoftext|> inside text",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there! 🤗"},
    {"role": "assistant", "content": "Hello. Café?"},
    {"role": "user", "content": "Yes <please>, with \"quotes\" & stuff"},
]

# Exercises what transformers adds to jinja: tojson (no HTML escaping, keys kept in order), loop controls,
# namespace, strftime_now, raise_exception, extra kwargs, the special-token variables and {% generation %}.
FEATURES_TEMPLATE = (
    "{% set ns = namespace(n=0) %}"
    "{% for m in messages %}"
    "{% if m.role == 'stop' %}{% break %}{% endif %}"
    "{% if m.role == 'bad' %}{{ raise_exception('bad role at ' ~ loop.index0) }}{% endif %}"
    "{% set ns.n = ns.n + 1 %}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}{{ m.role }}: {{ m | tojson }}\n{% endif %}"
    "{% endfor %}"
    "n={{ ns.n }} year={{ strftime_now('%Y') }} custom={{ custom | default('none') }} "
    "tools={{ tools is none }} bos={{ bos_token | default('unset') }}"
    "\n    {% if messages | length > 1 %}\nindented block tags are stripped\n    {% endif %}\n"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

STYLES = ["gpt2", "qwen", "llama"]


def _load_pair(path):
    return Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=STYLES)
def pair(request, tmp_path_factory):
    """(ours, transformers') on the same dir, one per tokenizer style; gpt2 gets the jinja-features template."""
    extra = {"chat_template": FEATURES_TEMPLATE} if request.param == "gpt2" else {}
    path = write_tokenizer_dir(tmp_path_factory.mktemp(request.param), request.param, **extra)
    return _load_pair(path)


def test_encode_matches_transformers_with_and_without_special_tokens(pair):
    ours, hf = pair
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text


def test_encode_batch_matches_transformers_and_single_encode(pair):
    ours, hf = pair
    for special in (True, False):
        batch = ours.encode_batch(TEXTS, add_special_tokens=special)
        assert batch == hf(TEXTS, add_special_tokens=special)["input_ids"]
        assert batch == [ours.encode(t, add_special_tokens=special) for t in TEXTS]


def test_decode_matches_transformers_with_and_without_skipping_special_tokens(pair):
    ours, hf = pair
    for text in TEXTS:
        ids = ours.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert ours.decode(torch.tensor(ours.encode(TEXTS[0]))) == ours.decode(ours.encode(TEXTS[0]))


def test_special_token_ids_and_vocab_size_match_transformers(pair):
    ours, hf = pair
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                        hf.pad_token_id)  # fmt: skip
    assert len(ours) == ours.vocab_size == len(hf)
    assert ours.special_tokens == hf.special_tokens_map


def test_chat_template_text_and_ids_match_transformers(pair):
    ours, hf = pair
    for generation_prompt in (False, True):
        text = ours.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt)
        assert text == hf.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt, tokenize=False)
        ids = ours.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt, tokenize=True)
        assert ids == hf.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt, return_dict=False)
        assert ids == ours.encode(text, add_special_tokens=False)


def test_save_pretrained_reloads_identically_in_both_libraries(pair, tmp_path):
    ours, hf = pair
    saved = ours.save_pretrained(tmp_path / "saved")
    for reloaded in _load_pair(saved):
        for text in TEXTS:
            assert reloaded.encode(text) == ours.encode(text), text
            ids = ours.encode(text)
            assert reloaded.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
        assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (
            ours.bos_token_id, ours.eos_token_id, ours.pad_token_id)  # fmt: skip
        assert len(reloaded) == len(ours)
        text = reloaded.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
        assert text == ours.apply_chat_template(CONVERSATION, add_generation_prompt=True)


def test_llama_adds_bos_once_and_chat_template_does_not_double_it(tmp_path):
    ours, hf = _load_pair(write_tokenizer_dir(tmp_path, "llama"))
    assert ours.add_bos_token and not ours.add_eos_token
    assert ours.encode("Hello")[:2] == [ours.bos_token_id, ours.encode("Hello", add_special_tokens=False)[0]]
    ids = ours.apply_chat_template(CONVERSATION[:2], tokenize=True)
    assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id
    assert ids == hf.apply_chat_template(CONVERSATION[:2], return_dict=False)


def test_add_bos_token_in_config_is_ignored_like_transformers_when_post_processor_adds_nothing(tmp_path):
    path = write_tokenizer_dir(tmp_path, "llama", add_bos_token=True, add_eos_token=True)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(spec))
    ours, hf = _load_pair(path)
    assert ours.encode("Hello") == hf.encode("Hello") == ours.encode("Hello", add_special_tokens=False)
    assert not ours.add_bos_token and not ours.add_eos_token


def test_legacy_llama_layout_follows_tokenizer_json_and_saved_copy_makes_transformers_agree(tmp_path):
    # transformers 5's LlamaTokenizer ignores this tokenizer.json's normalizer and builds a Metaspace pre-tokenizer,
    # so after a special token it encodes differently ("<s>x": no "▁" before x). We follow tokenizer.json, and
    # save_pretrained names the generic class so transformers reads the saved copy the same way.
    path = write_tokenizer_dir(tmp_path / "orig", "llama_legacy")
    ours, spec = Tokenizer.from_pretrained(path), tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    assert [ours.encode(t) for t in TEXTS] == [e.ids for e in spec.encode_batch(TEXTS)]
    hf_saved = AutoTokenizer.from_pretrained(ours.save_pretrained(tmp_path / "saved"))
    assert [hf_saved.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert [hf_saved.decode(ours.encode(t)) for t in TEXTS] == [ours.decode(ours.encode(t)) for t in TEXTS]


def test_llama2_template_raise_exception_surfaces_as_template_error(tmp_path):
    ours, hf = _load_pair(write_tokenizer_dir(tmp_path, "llama"))
    not_alternating = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for tok in (ours, hf):
        with pytest.raises(jinja2.TemplateError, match="must alternate"):
            tok.apply_chat_template(not_alternating, tokenize=False)


def test_chat_template_sees_kwargs_and_drops_none_valued_keys_like_transformers(tmp_path):
    ours, hf = _load_pair(write_tokenizer_dir(tmp_path, "gpt2", chat_template=FEATURES_TEMPLATE))
    messages = [{"role": "user", "content": "x", "name": None, "reasoning": "hmm"}, {"role": "stop"}, {"role": "user"}]
    text = ours.apply_chat_template(messages, custom="<&>", bos_token="BOS")
    assert text == hf.apply_chat_template(messages, custom="<&>", bos_token="BOS", tokenize=False)
    assert "custom=<&>" in text and "bos=BOS" in text and "null" not in text and '"reasoning_content": "hmm"' in text
    with pytest.raises(jinja2.TemplateError, match="bad role at 0"):
        ours.apply_chat_template([{"role": "bad", "content": ""}])


def test_named_templates_and_jinja_file_are_chosen_like_transformers(tmp_path):
    named = [{"name": "default", "template": CHATML_TEMPLATE}, {"name": "tool_use", "template": "TOOLS {{ tools }}"},
             {"name": "plain", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"}]  # fmt: skip
    ours, hf = _load_pair(write_tokenizer_dir(tmp_path / "named", "qwen", chat_template=named))
    tools = [{"type": "function", "function": {"name": "f"}}]
    inline = "inline {{ messages[0].role }}"
    for kwargs in ({}, {"tools": tools}, {"chat_template": "plain"}, {"chat_template": inline}):
        assert ours.apply_chat_template(CONVERSATION, **kwargs) == hf.apply_chat_template(
            CONVERSATION, tokenize=False, **kwargs)  # fmt: skip
    for reloaded in _load_pair(ours.save_pretrained(tmp_path / "saved")):
        assert reloaded.apply_chat_template(CONVERSATION, tools=tools, tokenize=False) == "TOOLS " + str(tools)

    path = write_tokenizer_dir(tmp_path / "file", "qwen")
    (path / "chat_template.jinja").write_text("FILE {{ messages | length }}", encoding="utf-8")
    ours, hf = _load_pair(path)
    assert ours.apply_chat_template(CONVERSATION) == hf.apply_chat_template(CONVERSATION, tokenize=False) == "FILE 4"


def test_config_special_token_missing_from_vocab_is_added_like_transformers(tmp_path):
    ours, hf = _load_pair(write_tokenizer_dir(tmp_path, "gpt2", pad_token="<pad>"))
    assert len(ours) == len(hf) == 401 and ours.pad_token_id == hf.pad_token_id == 400
    assert ours.encode("<pad> hi") == hf.encode("<pad> hi") and ours.encode("<pad> hi")[0] == 400
    assert ours.decode([400, 72], skip_special_tokens=True) == hf.decode([400, 72], skip_special_tokens=True)


def test_special_tokens_map_json_overrides_config_like_transformers(tmp_path):
    path = write_tokenizer_dir(tmp_path, "qwen", pad_token=None)
    (path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|im_start|>"}}))
    ours, hf = _load_pair(path)
    assert ours.pad_token_id == hf.pad_token_id == ours.token_to_id("<|im_start|>")


def test_missing_dir_raises_error_naming_it(tmp_path):
    with pytest.raises(TokenizerError, match="nope: tokenizer directory not found"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_missing_tokenizer_json_raises_error_naming_the_file(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not found; expected a `tokenizers` JSON"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_tokenizer_json_raises_error_naming_the_file(tmp_path):
    path = write_tokenizer_dir(tmp_path, "gpt2")
    (path / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: expected a `tokenizers` JSON file"):
        Tokenizer.from_pretrained(path)


@pytest.mark.parametrize("content, message", [("{not json", "expected a JSON object, could not read"),
                                              ("[1, 2]", "expected a JSON object, got list")])  # fmt: skip
def test_corrupt_tokenizer_config_raises_error_naming_the_file(tmp_path, content, message):
    path = write_tokenizer_dir(tmp_path, "gpt2")
    (path / "tokenizer_config.json").write_text(content)
    with pytest.raises(TokenizerError, match=rf"tokenizer_config\.json: {message}"):
        Tokenizer.from_pretrained(path)


def test_malformed_special_token_and_chat_template_raise_errors_naming_the_key(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: eos_token: expected a string"):
        Tokenizer.from_pretrained(write_tokenizer_dir(tmp_path / "a", "gpt2", eos_token={"text": "x"}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat_template: expected a string or a list"):
        Tokenizer.from_pretrained(write_tokenizer_dir(tmp_path / "b", "gpt2", chat_template=[{"name": "x"}]))


def test_missing_chat_template_raises_error_naming_the_dir(tmp_path):
    path = write_tokenizer_dir(tmp_path, "gpt2")
    tok = Tokenizer.from_pretrained(path)
    with pytest.raises(TokenizerError, match=rf"{path}: no chat template"):
        tok.apply_chat_template(CONVERSATION)


def test_bad_conversations_raise_clear_errors(tmp_path):
    named = [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]
    tok = Tokenizer.from_pretrained(write_tokenizer_dir(tmp_path, "qwen", chat_template=named))
    with pytest.raises(TokenizerError, match=r"none named 'default'; pass chat_template= one of \['a', 'b'\]"):
        tok.apply_chat_template(CONVERSATION)
    assert tok.apply_chat_template(CONVERSATION, chat_template="b") == "B"
    with pytest.raises(TokenizerError, match="empty conversation"):
        tok.apply_chat_template([], chat_template="a")
    with pytest.raises(TokenizerError, match=r"messages\[1\]: expected a dict"):
        tok.apply_chat_template([{"role": "user", "content": "x"}, "hi"], chat_template="a")


@pytest.mark.parametrize("style", ["llama", "gpt2", "qwen"])
def test_incremental_decoder_streams_exactly_the_decoded_text(tmp_path, style):
    from engine.data.tokenizer import IncrementalDecoder

    tok = Tokenizer.from_pretrained(write_tokenizer_dir(tmp_path, style=style))
    text = "Café naïve 東京 — emoji 👩‍💻 and  spaces\nnew line"
    ids = tok.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


# --- the default (minimal ChatML) chat template ------------------------------------------------------------------


def test_default_chat_template_renders_and_reloads_identically_in_transformers(tmp_path):
    from engine.data.tokenizer import DEFAULT_CHAT_TEMPLATE, with_default_chat_template

    for style in ("gpt2", "llama"):
        bare = Tokenizer.from_pretrained(write_tokenizer_dir(tmp_path / style, style, chat_template=None))
        ours = with_default_chat_template(bare)
        assert ours is not bare and not bare.chat_templates  # a copy: the loaded one keeps what its dir says
        assert ours.chat_templates == {"default": DEFAULT_CHAT_TEMPLATE}
        saved = ours.save_pretrained(tmp_path / f"{style}-saved")
        reloaded, hf = Tokenizer.from_pretrained(saved), AutoTokenizer.from_pretrained(str(saved))
        for gen in (False, True):
            text = ours.apply_chat_template(CONVERSATION, add_generation_prompt=gen)
            assert text == reloaded.apply_chat_template(CONVERSATION, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(CONVERSATION, add_generation_prompt=gen, tokenize=False)
            assert (ours.apply_chat_template(CONVERSATION, add_generation_prompt=gen, tokenize=True)
                    == hf(text, add_special_tokens=False)["input_ids"])
        eos = ours.special_tokens["eos_token"]
        assert text.startswith(f"<|im_start|>system\nYou are terse.{eos}\n") and text.endswith("<|im_start|>assistant\n")


def test_a_tokenizer_with_a_template_or_without_eos_is_left_as_it_is(tmp_path):
    from engine.data.tokenizer import with_default_chat_template

    own = Tokenizer.from_pretrained(write_tokenizer_dir(tmp_path / "own", "qwen"))
    assert own.chat_templates and with_default_chat_template(own) is own
    no_eos = Tokenizer.from_pretrained(write_tokenizer_dir(tmp_path / "noeos", "gpt2", chat_template=None,
                                                           eos_token=None, bos_token=None, pad_token=None))
    assert no_eos.eos_token_id is None and with_default_chat_template(no_eos) is no_eos


@pytest.mark.parametrize("fmt,template,chats", [("sft", "auto", True), ("sft", "chat", True), ("sft", "plain", False),
                                                ("text", "auto", False)])
def test_sft_runs_on_a_tokenizer_without_a_template_get_the_default_one(tmp_path, fmt, template, chats):
    from engine.config import RunConfig, from_dict
    from engine.train.run_factory import build_tokenizer
    from tests.train_fixtures import tiny_run_dict

    run = tiny_run_dict(tmp_path)
    run["model"]["tokenizer"] = str(write_tokenizer_dir(tmp_path / "tok", "gpt2", chat_template=None))
    if fmt == "sft":
        (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
        run["data"].update(format="sft", train=str(tmp_path / "train.jsonl"), sft={"template": template})
    tokenizer, _ = build_tokenizer(from_dict(RunConfig, run, where=""), progress=False)
    assert bool(tokenizer.chat_templates) is chats
