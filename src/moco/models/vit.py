"""Vision Transformers as MoCo v3 trains them (Chen, Xie & He, 2021), in plain PyTorch.

Two of v3's stability measures are built in: a fixed 2-D sin-cos position embedding (zero for the
class token), and a random patch projection that stays frozen (``stop_grad_conv1``: the paper's
cure for the training instability it traced to the first layer). The representation is the class
token after the final LayerNorm; the head sits in ``fc`` as in our ResNets, so the same code
evaluates and exports both. Parameter names are timm's ``VisionTransformer``'s (``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.N.attn.qkv`` …, ``norm``), so ``moco export
--format timm`` is this state dict without ``fc.*``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# width, depth, heads
VIT_ARCHS: dict[str, tuple[int, int, int]] = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
                                              "vit_base": (768, 12, 12)}


def default_patch_size(image_size: int) -> int:
    """Small patches for small images (28 / 32 px: 4, a 7x7 / 8x8 grid), 16 from 64 px up."""
    return 4 if image_size < 64 else 16


def sincos_position_embedding(grid: int, width: int, temperature: float = 10000.0) -> torch.Tensor:
    """1 x (1 + grid²) x width: for each patch, sines and cosines of its column and of its row at
    width/4 frequencies each; the class token's row is zero."""
    if width % 4:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 4, got {width}")
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    frequencies = temperature ** -(torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    angles_x = cols.flatten()[:, None] * frequencies[None]
    angles_y = rows.flatten()[:, None] * frequencies[None]
    patches = torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1)
    return torch.cat([torch.zeros(1, width), patches])[None]


class PatchEmbed(nn.Module):
    """Non-overlapping patches, linearly projected (a strided convolution)."""

    def __init__(self, patch_size: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, width = x.shape
        q, k, v = self.qkv(x).view(n, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT-Tiny / Small / Base (``arch``) on ``image_size`` images cut into ``patch_size`` patches."""

    def __init__(self, arch: str = "vit_small", image_size: int = 224, patch_size: int = 16, in_channels: int = 3,
                 num_classes: int = 0, stop_grad_conv1: bool = True) -> None:
        super().__init__()
        if arch not in VIT_ARCHS:
            raise ValueError(f"unknown ViT {arch!r}; choose one of {', '.join(VIT_ARCHS)}")
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        width, depth, heads = VIT_ARCHS[arch]
        self.arch, self.image_size, self.patch_size, self.width = arch, image_size, patch_size, width
        self.patch_embed = PatchEmbed(patch_size, in_channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(sincos_position_embedding(image_size // patch_size, width), requires_grad=False)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.fc: nn.Module = nn.Linear(width, num_classes) if num_classes else nn.Identity()
        self._init_like_moco_v3()
        if stop_grad_conv1:  # the random patch projection stays as initialised
            self.patch_embed.proj.weight.requires_grad_(False)
            self.patch_embed.proj.bias.requires_grad_(False)

    def _init_like_moco_v3(self) -> None:
        """Xavier-uniform linear layers (q, k and v each as its own matrix), a Xavier-uniform patch
        projection seen as a matrix, a class token of std 1e-6."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith("qkv"):
                    bound = math.sqrt(6.0 / (module.weight.shape[0] // 3 + module.weight.shape[1]))
                    nn.init.uniform_(module.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.patch_embed.proj
        bound = math.sqrt(6.0 / (proj.weight[0].numel() + self.width))  # fan in: channels x patch area
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The class token after the final norm: the representation."""
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
