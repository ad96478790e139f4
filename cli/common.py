"""What every CLI shares: one clear line and exit code 2 for our own errors, the `--set` flag, and the one
loader of a model (+ adapter) and its tokenizer for inference."""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from engine.config import ConfigError
from engine.data.text import DataError
from engine.data.tokenizer import Tokenizer, TokenizerError
from engine.dtypes import DTYPES, dtype_named
from engine.files import atomic_write
from engine.model.gguf_read import gguf_file
from engine.model.hf_format import WeightsError, resolve_model_dir
from engine.train.distributed import RankZeroFailed
from engine.train.metrics import MetricsError
from engine.train.run_state import TrainingStopped

USER_ERRORS = (ConfigError, DataError, WeightsError, TokenizerError, MetricsError, FileNotFoundError)
__all__ = ["DTYPES", "USER_ERRORS", "add_set_argument", "exit_on_user_error", "load_for_inference", "tell_torchrun"]


@contextmanager
def exit_on_user_error(prog: str):
    """Bad configs, files or arguments print `prog: error: ...` and exit 2, without a traceback."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        tell_torchrun(f"{prog}: exit code 2: a config or input error, printed above (search for '{prog}: error:')")
        sys.exit(2)
    except TrainingStopped as e:  # NaN loss, a collective timeout: one line, exit 1, no traceback
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except RankZeroFailed as e:  # under torchrun: rank 0 printed the error; leave with its exit code
        sys.exit(2 if isinstance(e.error, USER_ERRORS) else 1)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def tell_torchrun(message: str) -> None:
    """Under torchrun, put `message` in this worker's error file: torchrun's failure summary shows it as the root
    cause's "traceback" instead of a link to its docs. Outside torchrun (no TORCHELASTIC_ERROR_FILE), nothing."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # the layout torch.distributed.elastic's ErrorHandler.record_exception writes (and the agent reads back)
    data = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        atomic_write(path, json.dumps(data))
    except OSError:
        pass  # only a nicer summary is lost; the error itself is already on stderr


def add_set_argument(parser, example: str = "train.lr=1e-4") -> None:
    """The `--set KEY=VALUE` flag (repeatable) of every CLI that reads a run config; values land in args.overrides."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable; the value is JSON, or a "
                             "bare string)")


def load_for_inference(model, adapter=None, dtype="fp32", device=None, merge: bool = False,
                       require_tokenizer: bool = True, quantize: str | None = None):
    """(Transformer in eval mode, Tokenizer) from what a user passes as --model [--adapter].

    `model` is an HF model dir or hub id (through the one resolver, resolve_model_dir), a training checkpoint,
    or a LoRA run's adapter dir (final/ or a checkpoint: its base is adapter_config.json's
    base_model_name_or_path). `adapter` is a PEFT adapter dir applied on top; `merge` folds it into the weights
    so inference pays nothing for it. `quantize` ("nf4" | "int8", engine.quant) stores the block linears quantized
    (a merged adapter is merged first, in `dtype`, then quantized with the rest) and the LM head as int8.
    The tokenizer is the first tokenizer.json among the adapter dir, the model
    dir and the adapter's base; without one, a TokenizerError, or None when not `require_tokenizer`.
    """
    from torch import nn

    from engine.adapters.lora import merge_lora
    from engine.adapters.peft_format import ADAPTER_CONFIG, load_adapter, read_adapter_config
    from engine.model.transformer import Transformer

    dtype = dtype_named(dtype, "--dtype")
    model_dir = resolve_model_dir(model)
    adapter_dir = resolve_model_dir(adapter) if adapter is not None else None
    base_dir = model_dir
    if adapter_dir is None and (model_dir / ADAPTER_CONFIG).is_file():  # a LoRA run's final/ or checkpoint dir
        adapter_dir, base = model_dir, read_adapter_config(model_dir)[1]
        if not base:
            raise WeightsError(f"{model_dir / ADAPTER_CONFIG}: no base_model_name_or_path; pass the base model "
                               "with --model and this dir with --adapter")
        base_dir = resolve_model_dir(base)
    merge_first = adapter_dir is not None and merge
    net = Transformer.from_pretrained(base_dir, dtype=dtype, device=device, quantize=None if merge_first else quantize)
    if adapter_dir is not None:
        load_adapter(net, adapter_dir)
        if merge:
            merge_lora(net)
    if merge_first and quantize is not None:
        from engine.quant import quantize as quantize_layers
        quantize_layers(net, quantize)
    if quantize is not None and isinstance(net.lm_head, nn.Linear):  # (not a LoRA-wrapped head)
        from engine.quant import quantize_lm_head  # decoding reads the head every token: an int8 copy of it

        quantize_lm_head(net, "int8")
    candidates = list(dict.fromkeys(d for d in (adapter_dir, model_dir, base_dir) if d is not None))
    tok_dir = next((d for d in candidates if (Path(d) / "tokenizer.json").is_file() or gguf_file(d)), None)
    if tok_dir is None and require_tokenizer:
        raise TokenizerError(f"no tokenizer.json in {' or '.join(map(str, candidates))} (expected the tokenizer "
                             "saved beside the weights or the adapter)")
    return net.eval(), (Tokenizer.from_pretrained(tok_dir) if tok_dir is not None else None)
