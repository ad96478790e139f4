"""engine.model.recompute: activation checkpointing gives the gradients of the plain run bit for bit (LoRA
dropout replayed, bf16 autocast, a frozen embedding's output as the input), frees what it recomputed, works
through a retained graph, names a block that computes something else when run again, and never imports
torch._dynamo (the reason it exists)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from engine import ModelConfig, Transformer
from engine.adapters.lora import apply_lora
from engine.config import LoraConfig
from engine.model.recompute import checkpointed

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=53, hidden_size=24, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=6,
            intermediate_size=40, max_position_embeddings=64)


def _lora_grads(ckpt: bool, precision: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear", dropout=0.3))
    for p in model.parameters():
        if p.requires_grad:  # B starts at zero; random B makes every adapter's gradient non-trivial
            nn.init.normal_(p, 0.0, 0.1)
    model.gradient_checkpointing = ckpt
    model.train()
    ids = torch.randint(0, 53, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the dropout masks: the replay must draw the same ones
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_gradients_equal_the_plain_run_bit_for_bit(precision):
    plain, recomputed = _lora_grads(False, precision), _lora_grads(True, precision)
    assert len(plain) == 3 * 7 * 2 and all(g is not None and g.abs().sum() > 0 for g in recomputed)
    for g0, g1 in zip(plain, recomputed):
        torch.testing.assert_close(g1, g0, rtol=0, atol=0)


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 5))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(x @ self.w).sin()


def test_a_retained_graph_replays_for_its_second_backward():
    block, x = _Counting(), torch.randn(3, 5, requires_grad=True)
    out = checkpointed(block, x).sum()
    g1 = torch.autograd.grad(out, [x, block.w], retain_graph=True)
    g2 = torch.autograd.grad(out, [x, block.w])
    ref = torch.autograd.grad(block(x).sum(), [x, block.w])
    assert block.calls == 4  # forward, one replay per backward, the reference
    for a, b, c in zip(g1, g2, ref):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)


def test_without_grad_it_is_the_plain_call():
    block = _Counting()
    with torch.no_grad():
        out = checkpointed(block, torch.randn(3, 5))
    assert out.grad_fn is None and block.calls == 1


def test_a_block_that_changes_on_replay_is_named():
    class Fickle(_Counting):
        def forward(self, x):
            self.calls += 1
            return x @ self.w if self.calls == 1 else (x @ self.w).exp()  # the replay saves one tensor more

    x = torch.randn(3, 5, requires_grad=True)
    out = checkpointed(Fickle(), x).sum()
    with pytest.raises(RuntimeError, match="recomputing Fickle saved 3 tensors .* forward saved 2"):
        out.backward()


def test_recomputed_tensors_are_freed_with_the_graph():
    import weakref

    class Recording(_Counting):
        def forward(self, x):
            h = torch.tanh(x @ self.w)  # tanh saves its output: the replay's copy must not outlive backward
            self.made = getattr(self, "made", []) + [weakref.ref(h)]
            return h.sin()

    block = Recording()
    out = checkpointed(block, torch.randn(64, 5, requires_grad=True))
    out.sum().backward()
    del out
    assert len(block.made) == 2 and all(r() is None for r in block.made)  # no cycle through the replay's graph


def test_a_checkpointed_training_step_never_imports_dynamo():
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from engine import ModelConfig, Transformer
        model = Transformer(ModelConfig(**{TINY!r})).train()
        model.gradient_checkpointing = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randint(0, 53, (2, 9))).float().mean()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        print("dynamo" if "torch._dynamo" in sys.modules else "clean")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "clean"
