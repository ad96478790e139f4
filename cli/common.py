"""What every CLI shares: turning our own errors into one clear line and exit code 2."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

from engine.config import ConfigError
from engine.data.text import DataError
from engine.train.distributed import RankZeroFailed
from engine.train.metrics import MetricsError
from engine.train.run_state import TrainingStopped
from engine.data.tokenizer import TokenizerError
from engine.model.hf_format import WeightsError

USER_ERRORS = (ConfigError, DataError, WeightsError, TokenizerError, MetricsError, FileNotFoundError)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@contextmanager
def exit_on_user_error(prog: str):
    """Bad configs, files or arguments print `prog: error: ...` and exit 2, without a traceback."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:  # NaN loss, a collective timeout: one line, exit 1, no traceback
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except RankZeroFailed as e:  # under torchrun: rank 0 printed the error; leave with its exit code
        sys.exit(2 if isinstance(e.error, USER_ERRORS) else 1)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
