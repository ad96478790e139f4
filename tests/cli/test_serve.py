"""python -m cli.serve: argument and model errors exit 2 without a traceback; a real process serves requests."""
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli.serve import build_app, check_file_limit, load, main, parse_args
from engine import Transformer
from tests.hf_models import save_demo_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_cli_demo")
    save_demo_model(d)
    return d


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "cli.serve: error:"),
    (["--model", "DEMO", "--adapter", "/nonexistent/adapter"], "cli.serve: error:"),
    (["--model", "DEMO", "--max-batch", "0"], "--max-batch: expected a positive integer"),
    (["--model", "DEMO", "--port", "70000"], "--port: expected 0..65535"),
])
def test_bad_arguments_exit_2_with_one_clear_line(demo_dir, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(demo_dir) if a == "DEMO" else a for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_a_port_in_use_exits_2_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:  # the model does not exist: a port checked after loading would say so
            main(["--model", "/nonexistent/model", "--port", str(port)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"cli.serve: error: --host/--port: cannot listen on 127.0.0.1:{port}: "), err


@pytest.mark.parametrize("module, defaults", [
    ("cli.serve", ["127.0.0.1", "8000", "fp32", "16", "2048", "1048576", "512", "10.0", "30.0", "2.0", "info"]),
    ("cli.generate", ["128", "0.0", "fp32", "False"]),
])
def test_help_shows_the_defaults(module, defaults):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    out = " ".join(out.split())  # argparse wraps long lines
    for default in defaults:
        assert f"(default: {default})" in out, default


def test_the_open_file_limit_is_raised_to_fit_the_connection_cap_or_a_warning_says_why_not(caplog):
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2000:
        pytest.skip(f"needs a finite hard limit on open files of at least 2000, got {hard}")
    log = logging.getLogger("engine.infer.serve")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # a common default soft limit
        with caplog.at_level(logging.WARNING, logger="engine.infer.serve"):
            check_file_limit(1500, log)  # 1500 + 8 for /health + 64 spare fit under the hard limit: raised quietly
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 1572 and not caplog.records
            check_file_limit(hard, log)  # cannot fit: raised as far as it goes, with a warning
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        assert len(caplog.records) == 1 and "ulimit -n" in caplog.records[0].getMessage()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_defaults_are_safe():
    args = parse_args(["--model", "m"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)


def write_adapter(demo_dir, directory):
    """A LoRA adapter with non-zero B (a no-op adapter would prove nothing): (the model with it applied, its dir)."""
    lora_mod = pytest.importorskip("engine.adapters.lora")
    from engine.adapters.peft_format import save_adapter
    from engine.config import LoraConfig

    model = Transformer.from_pretrained(demo_dir)
    lora_mod.apply_lora(model, LoraConfig(rank=4, alpha=8.0), str(demo_dir))
    with torch.no_grad():
        for m in lora_mod.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.5)
    save_adapter(model, directory)
    return model, directory


def test_adapter_is_merged_into_the_served_model(demo_dir, tmp_path):
    lora_mod = pytest.importorskip("engine.adapters.lora")
    model, adapter = write_adapter(demo_dir, tmp_path / "adapter")
    served, _ = load(parse_args(["--model", str(demo_dir), "--adapter", str(adapter)]))
    assert not lora_mod.is_lora(served)  # merged: serving pays nothing for the adapter
    prompt = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        torch.testing.assert_close(served(prompt), model.eval()(prompt), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(served(prompt), Transformer.from_pretrained(demo_dir)(prompt), atol=1e-3)


def test_start_up_names_the_adapter_and_the_limits(demo_dir, tmp_path, caplog):
    _, adapter = write_adapter(demo_dir, tmp_path / "adapter")
    args = parse_args(["--model", str(demo_dir), "--adapter", str(adapter), "--max-connections", "7"])
    with caplog.at_level(logging.INFO, logger="engine.infer.serve"):
        app = build_app(args, logging.getLogger("engine.infer.serve"))
    app.state.batcher.close()
    lines = [r.getMessage() for r in caplog.records]
    assert f"adapter: {adapter} (LoRA, merged into the weights)" in lines, lines
    assert any(line.startswith("limits: 7 API connections (+8 for /health)") for line in lines), lines


def test_server_process_answers_the_openai_client(demo_dir):
    openai = pytest.importorskip("openai")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli.serve", "--model", str(demo_dir), "--port", str(port),
                             "--api-key", "k", "--served-model-name", "tiny", "--log-level", "info"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=10)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["tiny"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
        assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    out = proc.stdout.read()
    # The kernels backend is logged at start-up (by a warm-up forward), before the first request is answered.
    kernels = next(i for i, line in enumerate(out.splitlines()) if "kernels:" in line)
    first_request = next(i for i, line in enumerate(out.splitlines()) if "GET /v1/models" in line)
    assert kernels < first_request, out
