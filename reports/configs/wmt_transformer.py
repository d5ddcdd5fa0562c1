"""The Transformers SMMF Table 2 trains on WMT32k, as ``torch.nn.Transformer`` with embeddings around it.

Dimensions from Vaswani et al., "Attention Is All You Need" (2017), Table 3: base is N = 6 encoder and
6 decoder layers, d_model 512, d_ff 2048, h = 8; big is d_model 1024, d_ff 4096, h = 16. The
vocabulary is tensor2tensor's WMT32k subword vocabulary, 2**15 = 32,768 entries (SMMF digest §4: the
paper's "WMT32k" is tensor2tensor's translate_ende_wmt32k). Source embedding, target embedding and
output projection are separate matrices, which is what the paper's Adam memory implies (0.7 GiB is
8 B × 94.5M parameters: base with three untied 32,768-row tables; big 277M, 2.06 GiB, prints as 2.1).
Positions are the fixed sinusoids (a buffer, no parameters); dropout 0.1, post-norm, ReLU, as in the paper.

Use: ``memprof compare --model reports/configs/wmt_transformer.py:transformer_base`` (or ``transformer_big``);
``--seq-len`` is the source and target length, ``--batch-size`` the sentences per batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 32768
SIZES = {"base": dict(d_model=512, nhead=8, dim_feedforward=2048), "big": dict(d_model=1024, nhead=16, dim_feedforward=4096)}
LAYERS = 6


def sinusoids(length: int, width: int) -> torch.Tensor:
    position = torch.arange(length).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class WmtTransformer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, max_len: int) -> None:
        super().__init__()
        self.scale = math.sqrt(d_model)
        self.source_embedding = nn.Embedding(VOCAB, d_model)
        self.target_embedding = nn.Embedding(VOCAB, d_model)
        self.register_buffer("positions", sinusoids(max_len, d_model), persistent=False)
        self.transformer = nn.Transformer(d_model, nhead, LAYERS, LAYERS, dim_feedforward, dropout=0.1,
                                          batch_first=True)
        self.output = nn.Linear(d_model, VOCAB)

    def embed(self, table: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        return table(tokens) * self.scale + self.positions[: tokens.shape[1]]

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(target.shape[1], device=target.device)
        hidden = self.transformer(self.embed(self.source_embedding, source), self.embed(self.target_embedding, target),
                                  tgt_mask=causal, tgt_is_causal=True)
        return self.output(hidden)


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["source"], batch["target"])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), label_smoothing=0.1)


def _build(size: str, options):
    model = WmtTransformer(**SIZES[size], max_len=options.seq_len)
    generator = torch.Generator().manual_seed(0)
    shape = (options.batch_size, options.seq_len)
    batch = {name: torch.randint(0, VOCAB, shape, generator=generator) for name in ("source", "target", "labels")}
    return model, batch, _loss


def transformer_base(options):
    return _build("base", options)


def transformer_big(options):
    return _build("big", options)
