"""The peer row of bench/bench_qlora.py: transformers + PEFT + bitsandbytes 4-bit (NF4, double-quantized, bf16
compute) on CPU, QLoRA as its docs set it up, on the same Qwen2.5-0.5B shape, tokens and LoRA (r 16, alpha 32,
all linears), with activation checkpointing and AdamW. bitsandbytes is imported here only (a peer, never engine/).

The model is random-init in bf16 (no network), each block linear swapped for a bnb Linear4bit quantized from
its own weight one at a time, as from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True)) does.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_peft_nf4(shape: dict):
    """Qwen2ForCausalLM of `shape` (bench_finetune.QWEN05B keys), NF4 block linears, PEFT LoRA on top."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.quant.bitsandbytes_oracle import import_bitsandbytes

    bnb = import_bitsandbytes("bitsandbytes")
    cfg = Qwen2Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                      num_key_value_heads=shape["num_kv_heads"], intermediate_size=shape["intermediate_size"],
                      max_position_embeddings=shape["max_position_embeddings"], rope_theta=shape["rope_theta"],
                      tie_word_embeddings=True, torch_dtype="bfloat16", use_cache=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64).to("cpu")
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del lin
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    return model


def peft_step_fn(model):
    """One optimizer step on tokens [B, T + 1] under bf16 autocast (HF's mean loss over the shifted labels)."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    losses = []

    def step(tokens):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    return step, losses
