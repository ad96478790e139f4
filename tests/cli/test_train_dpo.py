"""cli.train on a DPO config prints the held-out (data.val) preference accuracy, reference -> policy, at the end."""
import json
import re

import pytest

from cli.train import main
from tests.finetune_fixtures import pretrained_dir
from tests.train.test_dpo import dpo_run_dict

LINE = r"held-out preference accuracy \(8 pairs of data\.val, chosen logp > rejected logp\): " \
       r"(\d+\.\d)% \(reference\) -> (\d+\.\d)% \(policy\)"


@pytest.mark.parametrize("lora", [True, False])
def test_dpo_run_prints_heldout_preference_accuracy(tmp_path, capsys, lora):
    raw = dpo_run_dict(tmp_path, pretrained_dir(tmp_path / "base"), lora=lora, max_steps=4, eval_every=0,
                       save_every=0)
    (tmp_path / "run.json").write_text(json.dumps(raw))
    main([str(tmp_path / "run.json"), "--no-progress"])
    out = capsys.readouterr().out
    found = re.search(LINE, out)
    assert found, out
    ref, pol = map(float, found.groups())
    assert pol >= ref  # terse vs rambling: the shorter side starts ahead (a random tiny model is near 100% already)
