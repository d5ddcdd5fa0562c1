"""Tiny models for the engine's tests, loaded through memprof's ``file.py:function`` model spec."""

import torch
from torch import nn

MLP_SHAPES = [(32, 16), (32,), (4, 32), (4,)]


def mlp(options):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(options.batch_size, 16)
    return model, {"input": x, "labels": torch.randint(0, 4, (options.batch_size,))}


def tiny_gpt2(options):
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=500, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 500, (options.batch_size, 16))
    return model, {"input_ids": ids, "labels": ids}
