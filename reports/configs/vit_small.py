"""The "ViT-small" of IO-Adam's Table 4: the vit-pytorch ``ViT`` layout on CIFAR-10, written here.

Settings from the paper (io-adam-digest §4): 32×32 images, patch 4 (64 patches + a class token),
dim 128, depth 6, heads 16, dim_head 64 (vit-pytorch's default), mlp_dim 2048, 10 classes:
6,324,970 parameters. Layout as in vit-pytorch: the patch embedding is LayerNorm → Linear →
LayerNorm on flattened 4×4×3 patches; each block is pre-norm attention (bias-free qkv Linear,
output Linear) and a pre-norm GELU MLP, both residual; a final LayerNorm, then a Linear head on
the class token. Every projection is an ``nn.Linear``, so IO-Adam folds all of them.

Use: ``memprof compare --model reports/configs/vit_small.py:vit_small`` (the batch follows
``--batch-size``; the image side is fixed at 32 because the position table depends on it).
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 32
PATCH = 4
DIM = 128
DEPTH = 6
HEADS = 16
DIM_HEAD = 64
MLP_DIM = 2048
CLASSES = 10


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        inner = HEADS * DIM_HEAD
        self.norm = nn.LayerNorm(DIM)
        self.to_qkv = nn.Linear(DIM, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).view(batch, tokens, 3, HEADS, DIM_HEAD).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-1, -2) * DIM_HEAD ** -0.5).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, tokens, HEADS * DIM_HEAD)
        return self.to_out(out)


class FeedForward(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.LayerNorm(DIM), nn.Linear(DIM, MLP_DIM), nn.GELU(), nn.Linear(MLP_DIM, DIM))


class ViT(nn.Module):
    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        patch_dim = 3 * PATCH * PATCH
        num_patches = (IMAGE_SIZE // PATCH) ** 2
        self.patch_norm_in = nn.LayerNorm(patch_dim)
        self.patch_proj = nn.Linear(patch_dim, DIM)
        self.patch_norm_out = nn.LayerNorm(DIM)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, DIM))
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.blocks = nn.ModuleList(nn.ModuleList([Attention(), FeedForward()]) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        side = IMAGE_SIZE // PATCH
        # b c (h p1) (w p2) -> b (h w) (p1 p2 c), as vit-pytorch's Rearrange
        patches = images.view(batch, 3, side, PATCH, side, PATCH).permute(0, 2, 4, 3, 5, 1)
        x = self.patch_norm_out(self.patch_proj(self.patch_norm_in(patches.reshape(batch, side * side, -1))))
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1) + self.pos_embedding
        for attention, feed_forward in self.blocks:
            x = attention(x) + x
            x = feed_forward(x) + x
        return self.head(self.norm(x)[:, 0])


def vit_small(options) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model and a random CIFAR-10 batch of ``options.batch_size`` images with integer labels.

    The batch is made on the CPU from a seeded generator (memprof moves it to the device).
    """
    classes = options.num_classes or CLASSES
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(options.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator, device="cpu")
    labels = torch.randint(0, classes, (options.batch_size,), generator=generator, device="cpu")
    return ViT(classes), {"input": images, "labels": labels}
