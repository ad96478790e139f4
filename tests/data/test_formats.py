"""Instruction formats: Alpaca, ShareGPT, OpenAI messages, prompt/completion and column mappings all become the
SFT shapes sft.py trains on; each gives exactly the tokens its hand-written messages/prompt-completion twin gives."""
import numpy as np
import pytest

from engine import Tokenizer
from engine.config import ConfigError, DataConfig, RunConfig, SFTConfig, from_dict
from engine.data.formats import detect_format, to_sft_record
from engine.data.sft import prepare_sft
from engine.data.text import DataError
from tests.finetune_fixtures import write_jsonl
from tests.tokenizer_fixtures import write_tokenizer_dir

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "2+2?"},
                              {"from": "gpt", "value": "4"}]}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    return Tokenizer.from_pretrained(write_tokenizer_dir(tmp_path_factory.mktemp("tok"), style="qwen"))


def _sft(**kw) -> SFTConfig:
    return SFTConfig(**kw)


@pytest.mark.parametrize("row,expected", [
    (ALPACA, {"prompt": "Add the numbers.\n\n2 and 3", "completion": "5"}),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, {"prompt": "Say hi.", "completion": "hi"}),
    ({"instruction": "Say hi.", "input": None, "output": "hi"}, {"prompt": "Say hi.", "completion": "hi"}),
    ({"instruction": "Say hi.", "output": "hi", "system": "S"},
     {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Say hi."},
                   {"role": "assistant", "content": "hi"}]}),
    (SHAREGPT, {"messages": MESSAGES}),
    ({"system": "Be brief.", "conversations": SHAREGPT["conversations"][1:]}, {"messages": MESSAGES}),
    ({"messages": MESSAGES, "id": 7}, {"messages": MESSAGES}),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                   {"role": "assistant", "content": "c"}]},
     {"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]}),
    ({"prompt": "1+1=", "completion": "2"}, {"prompt": "1+1=", "completion": "2"}),
    ({"prompt": MESSAGES[:4], "completion": MESSAGES[4:]}, {"messages": MESSAGES}),  # TRL conversational form
])
def test_each_format_is_detected_and_mapped(row, expected):
    assert to_sft_record(row, "x:1") == expected


def test_named_formats_and_column_mappings():
    row = {"question": "Why?", "answer": "Because.", "meta": 1}
    mapped = to_sft_record(row, "x:1", _sft(columns={"prompt": "question", "completion": "answer"}))
    assert mapped == {"prompt": "Why?", "completion": "Because."}
    alpaca = {"task": "Add.", "numbers": "2 3", "sum": "5"}
    cols = {"instruction": "task", "input": "numbers", "output": "sum"}
    assert to_sft_record(alpaca, "x:1", _sft(format="alpaca", columns=cols)) == {"prompt": "Add.\n\n2 3",
                                                                                  "completion": "5"}
    dialog = {"dialog": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]}
    out = to_sft_record(dialog, "x:1", _sft(format="sharegpt", columns={"conversations": "dialog"},
                                             roles={"bot": "assistant"}))
    assert out == {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    assert detect_format({"instruction": "a", "output": "b", "prompt": "c", "completion": "d"}) == "alpaca"


@pytest.mark.parametrize("row,sft,message", [
    ({"question": "a", "answer": "b"}, {}, 'x:1: expected a JSON object with "prompt" and "completion", or '
     '"messages" (or ShareGPT "conversations", or Alpaca "instruction"/"output"; else set data.sft.columns); '
     "fields seen: question, answer"),
    ({"question": "a"}, {"columns": {"prompt": "question", "completion": "reply"}},
     "x:1: data.sft.columns names 'reply', not among the fields seen: question"),
    ({"prompt": "a", "completion": "b"}, {"format": "alpaca"},
     "x:1: data.sft.format 'alpaca' needs field(s) instruction, output; fields seen: prompt, completion"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, {},
     "x:1: conversations[0]: unknown speaker 'bot' (known: human, user, gpt"),
    ({"conversations": []}, {}, "x:1: 'conversations': expected a non-empty list"),
    ({"conversations": [{"role": "user", "content": "x"}]}, {}, "x:1: conversations[0]: expected an object with"),
    ({"instruction": "a", "output": 3}, {}, "x:1: 'output': expected a string, got int"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {},
     "x:1: messages[0]: only text content parts"),
    (["a"], {}, "x:1: expected a JSON object (one example), got list"),
])
def test_unusable_rows_are_one_line_errors_listing_the_fields_seen(row, sft, message):
    with pytest.raises(DataError) as info:
        to_sft_record(row, "x:1", _sft(**sft))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("sft,message", [
    ({"format": "alpacca"}, "data.sft.format: expected one of"),
    ({"columns": {"question": "q"}}, "data.sft.columns.question: unknown field; expected some of messages,"),
    ({"columns": {"prompt": 3}}, "data.sft.columns.prompt: expected a non-empty string, got 3"),
    ({"roles": {"bot": ""}}, "data.sft.roles.bot: expected a non-empty string"),
])
def test_bad_format_options_are_config_errors(sft, message):
    raw = {"model": {"from_pretrained": "x"}, "data": {"train": "a", "format": "sft", "sft": sft}}
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, raw, where="")


def _examples(tmp_path, name, records, chat_tok, **sft):
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    cfg = DataConfig(train=(str(path),), format="sft", seq_len=128, val_fraction=0.0, sft=SFTConfig(**sft))
    return prepare_sft(cfg, chat_tok).train.examples


def _same(a, b):
    assert len(a) == len(b) > 0
    for (ids_a, sup_a), (ids_b, sup_b) in zip(a, b):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(sup_a, sup_b)


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_alpaca_trains_on_exactly_the_tokens_of_its_prompt_completion_twin(tmp_path, chat_tok, template):
    alpaca = [ALPACA, {"instruction": "Name a color.", "input": "", "output": "Red."}]
    twin = [{"prompt": "Add the numbers.\n\n2 and 3", "completion": "5"}, {"prompt": "Name a color.",
                                                                           "completion": "Red."}]
    _same(_examples(tmp_path, "alpaca", alpaca, chat_tok, template=template),
          _examples(tmp_path, "twin", twin, chat_tok, template=template))


def test_sharegpt_and_openai_content_parts_train_on_the_tokens_of_plain_messages(tmp_path, chat_tok):
    reference = _examples(tmp_path, "messages", [{"messages": MESSAGES}], chat_tok)
    _same(_examples(tmp_path, "sharegpt", [SHAREGPT], chat_tok, format="sharegpt"), reference)
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    _same(_examples(tmp_path, "parts", [{"messages": parts}], chat_tok), reference)
    mixed = [SHAREGPT, ALPACA, {"messages": MESSAGES}]  # auto: each row on its own
    assert len(_examples(tmp_path, "mixed", mixed, chat_tok)) == 3


def test_a_bad_row_in_a_file_names_the_file_and_line(tmp_path, chat_tok):
    with pytest.raises(DataError, match=r"rows\.jsonl:2: expected a JSON object .* fields seen: q, a"):
        _examples(tmp_path, "rows", [ALPACA, {"q": "x", "a": "y"}], chat_tok)
