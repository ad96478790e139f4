"""Common instruction-data shapes -> the two SFT shapes engine/data/sft.py renders: {"messages"} or
{"prompt", "completion"}.

`data.sft.format` names the shape, or "auto" detects it per row from its fields:
  messages           OpenAI chat: {"messages": [{"role", "content"}, ...]}; a content may be a list of
                     {"type": "text", "text"} parts (joined); passed through as is otherwise
  sharegpt           {"conversations": [{"from", "value"}, ...], "system"?}; `from` is mapped to a role by
                     SHAREGPT_ROLES plus `data.sft.roles` (e.g. {"bot": "assistant"})
  alpaca             {"instruction", "input"?, "output", "system"?}: prompt = instruction, then a blank line and
                     the input when it is not empty; completion = output (with a system: messages)
  prompt_completion  {"prompt", "completion"}: strings, or (TRL's conversational form) lists of messages
`data.sft.columns` renames first, {field above: column in the data}, e.g. {"prompt": "question",
"completion": "answer"}, so any dataset whose columns hold these pieces fits one of the shapes.
A row no shape fits is a DataError listing the fields it has.
"""
from __future__ import annotations

from engine.config import SFTConfig
from engine.data.documents import DataError

__all__ = ["SHAREGPT_ROLES", "detect_format", "to_sft_record"]

# ShareGPT speaker names seen in the wild (Vicuna, LLaMA-Factory, OpenHermes, SlimOrca) -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
# the fields each shape requires, in the order "auto" tries them
REQUIRED = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
            "prompt_completion": ("prompt", "completion")}


def detect_format(row: dict) -> str | None:
    """The first shape in REQUIRED whose fields `row` has, or None."""
    return next((name for name, keys in REQUIRED.items() if all(k in row for k in keys)), None)


def to_sft_record(row, where: str, sft: SFTConfig | None = None) -> dict:
    """`row` (one .jsonl line or dataset row) as {"messages"} or {"prompt", "completion"}; `where` names it."""
    sft = sft or SFTConfig()
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object (one example), got {type(row).__name__}")
    if sft.columns:
        missing = [col for col in sft.columns.values() if col not in row]
        if missing:
            raise DataError(f"{where}: data.sft.columns names {', '.join(map(repr, missing))}, not among the fields "
                            f"seen: {_fields(row)}")
        row = {**{k: v for k, v in row.items() if k not in sft.columns}, **{f: row[c] for f, c in sft.columns.items()}}
    fmt = sft.format if sft.format != "auto" else detect_format(row)
    if fmt is None:
        raise DataError(f'{where}: expected a JSON object with "prompt" and "completion", or "messages" (or '
                        f'ShareGPT "conversations", or Alpaca "instruction"/"output"; else set data.sft.columns); '
                        f"fields seen: {_fields(row)}")
    missing = [k for k in REQUIRED[fmt] if k not in row]
    if missing:
        raise DataError(f"{where}: data.sft.format {fmt!r} needs field(s) {', '.join(missing)}; fields seen: "
                        f"{_fields(row)}")
    return _CONVERT[fmt](row, where, sft)


def _fields(row: dict) -> str:
    return ", ".join(map(str, row)) or "none"


def _text(value, where: str) -> str:
    """A message content: a string, or OpenAI's list of {"type": "text", "text"} parts (joined)."""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in value):
            raise DataError(f"{where}: only text content parts ({{\"type\": \"text\", \"text\"}}) can be trained on")
        return "".join(p["text"] for p in value)
    return value  # sft.check_record reports a non-string


def _messages(row, where, sft):
    messages = row["messages"]
    if isinstance(messages, list) and all(isinstance(m, dict) and "content" in m for m in messages):
        messages = [{**m, "content": _text(m["content"], f"{where}: messages[{i}]")} for i, m in enumerate(messages)]
    return {"messages": messages}


def _sharegpt(row, where, sft):
    turns, roles = row["conversations"], {**SHAREGPT_ROLES, **(sft.roles or {})}
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations': expected a non-empty list of {{\"from\", \"value\"}} objects")
    messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and \
        row["system"] else []
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and "value" in turn):
            raise DataError(f"{where}: conversations[{i}]: expected an object with 'from' and 'value'")
        if turn["from"] not in roles:
            raise DataError(f"{where}: conversations[{i}]: unknown speaker {turn['from']!r} (known: "
                            f"{', '.join(roles)}); map it with data.sft.roles, e.g. {{\"{turn['from']}\": "
                            f"\"assistant\"}}")
        messages.append({"role": roles[turn["from"]], "content": _text(turn["value"], f"{where}: conversations[{i}]")})
    return {"messages": messages}


def _alpaca(row, where, sft):
    for key in ("instruction", "input", "output", "system"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise DataError(f"{where}: {key!r}: expected a string, got {type(row[key]).__name__}")
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if row.get("system"):
        return {"messages": [{"role": "system", "content": row["system"]}, {"role": "user", "content": prompt},
                             {"role": "assistant", "content": row["output"]}]}
    return {"prompt": prompt, "completion": row["output"]}


def _prompt_completion(row, where, sft):
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
        return _messages({"messages": prompt + completion}, where, sft)
    return {"prompt": prompt, "completion": completion}


_CONVERT = {"messages": _messages, "sharegpt": _sharegpt, "alpaca": _alpaca, "prompt_completion": _prompt_completion}
