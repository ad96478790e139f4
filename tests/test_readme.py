"""The README's quoted outputs are what the commands print today (issue: numbers in the README drifted).

Outputs that are a pure function of the config (the memory plan) are compared line for line; outputs of
training depend on the CPU (float rounding of threaded kernels), so for those the README quotes one machine's
numbers and this test checks only that every quoted line has the shape the command prints now (numbers and
paths masked), by running the same command on a tiny run.
"""
import re
import subprocess
import sys
from pathlib import Path

from tests.train_fixtures import tiny_run_dict, write_config_file

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
PATH = re.compile(r"\S*/\S*")


def code_blocks(text: str) -> list[str]:
    """The bodies of the README's fenced code blocks, in order."""
    blocks, body = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if body is None:
                body = []
            else:
                blocks.append("\n".join(body))
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def quoted_output(command: str) -> list[str]:
    """The lines after `$ <command>` in a README code block, up to the next `$` line or the block's end."""
    block = next((b for b in code_blocks(README) if f"$ {command}\n" in b + "\n"), None)
    assert block is not None, f"README: no output block for `$ {command}`"
    lines = (block + "\n").split(f"$ {command}\n", 1)[1].splitlines()
    return lines[:next((i for i, line in enumerate(lines) if line.startswith("$ ")), len(lines))]


def shape(line: str) -> str:
    """A line with its paths and numbers masked: what must not drift when the numbers may."""
    return re.sub(r"\s+", " ", NUMBER.sub("N", PATH.sub("P", line))).strip()


def run(*argv, cwd=ROOT) -> str:
    result = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_quoted_memory_plan_is_what_cli_plan_prints():
    printed = run("-m", "cli.plan", "configs/quickstart.json").splitlines()
    quoted = quoted_output("python -m cli.plan configs/quickstart.json")
    machine_specific = ("available:",)  # the RAM of the machine that ran it
    assert [shape(l) if l.startswith(machine_specific) else l for l in printed] == \
           [shape(l) if l.startswith(machine_specific) else l for l in quoted]


def test_the_quoted_sft_example_lines_have_the_shape_the_commands_print(tmp_path):
    """The README's SFT example (minutes of training) quotes one machine's numbers; the same commands on a tiny
    LoRA + SFT run must print lines of the same shape: every quoted line appears, numbers and paths aside."""
    from tests.finetune_fixtures import lora_run_dict, pretrained_dir

    config = lora_run_dict(tmp_path, pretrained_dir(tmp_path / "base"), sft=True)
    train = subprocess.run([sys.executable, "-m", "cli.train", str(write_config_file(tmp_path / "sft.json", config)),
                            "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    plot = run("-m", "cli.plot", config["out_dir"])
    printed = {shape(line) for line in (train.stdout + train.stderr + plot).splitlines()}
    quoted = (quoted_output("python -m cli.train configs/sft_quickstart.json --no-progress")
              + quoted_output("python -m cli.plot runs/quickstart"))
    assert quoted and [line for line in quoted if shape(line) not in printed] == []
