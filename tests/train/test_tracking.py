"""logging.tensorboard and logging.wandb (offline, no network): real runs of a tiny training; a missing
package prints one line and training goes on."""
import sys

import pytest

from engine.config import RunConfig, from_dict
from engine.train.loop import train
from tests.train_fixtures import tiny_run_dict

TAGS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/perplexity"}


def _config(tmp_path, logging: dict) -> RunConfig:
    return from_dict(RunConfig, {**tiny_run_dict(tmp_path, max_steps=4, eval_every=2, save_every=0),
                                 "logging": logging}, where="")


def test_tensorboard_event_files_hold_every_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_config(tmp_path, {"tensorboard": True}), progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == TAGS
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4]


def test_wandb_offline_run_is_written_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(_config(tmp_path, {"wandb": {"project": "engine-tests", "mode": "offline"}}), progress=False)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert [f for f in runs[0].glob("run-*.wandb") if f.stat().st_size > 0]


@pytest.mark.parametrize("module,logging,line", [
    ("torch.utils.tensorboard", {"tensorboard": True}, "logging.tensorboard: the tensorboard package is not installed"),
    ("wandb", {"wandb": {"project": "p"}}, "logging.wandb: the wandb package is not installed"),
])
def test_a_missing_tracker_package_logs_one_line_and_training_goes_on(tmp_path, monkeypatch, caplog, module,
                                                                        logging, line):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is not installed
    result = train(_config(tmp_path, logging), progress=False)
    assert result.step == 4 and result.final_dir.is_dir()
    assert caplog.text.count(line) == 1  # library code logs (cli.train shows it on stderr)
