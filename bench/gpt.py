"""A small GPT-style transformer and a synthetic language for it, for the demo and benchmarks.

Real parts, small sizes: token and position embeddings, pre-norm blocks of
causal multi-head self-attention and an MLP, tied output projection, AdamW.
The training text is generated, never downloaded: a little probabilistic
grammar over a 64-symbol alphabet, so the loss falls visibly in a few hundred
steps and every (step, rank) batch is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GPT", "GPTConfig", "batch", "make_model"]


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 64
    context: int = 32
    width: int = 64
    heads: int = 4
    layers: int = 2
    lr: float = 3e-3

    def nparams(self) -> int:
        per_layer = 12 * self.width * self.width + 13 * self.width
        return self.vocab * self.width + self.context * self.width + self.layers * per_layer


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: stored once, restored tied
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)
                bias = getattr(mod, "bias", None)
                if isinstance(bias, torch.Tensor):
                    nn.init.zeros_(bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_model(cfg: GPTConfig, seed: int = 0) -> tuple[GPT, torch.optim.Optimizer]:
    """The model (same weights for every rank given the seed) and its AdamW optimizer."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    return model, opt


def batch(
    cfg: GPTConfig, step: int, rank: int, size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the synthetic language for (step, rank): inputs and next-token targets.

    Each sequence follows a hidden rule: symbol x is followed by
    (a * x + b) mod vocab, where b is fixed per sequence and a alternates
    between two values by position, with 10% noise: a bigram table explains
    most of it, attention to earlier symbols the rest.
    """
    g = torch.Generator().manual_seed(step * 7919 + rank * 104729 + 1)
    n = cfg.context + 1
    b = torch.randint(0, 4, (size,), generator=g)
    seq = torch.empty(size, n, dtype=torch.long)
    seq[:, 0] = torch.randint(0, cfg.vocab, (size,), generator=g)
    for i in range(1, n):
        a = 5 if i % 2 else 3
        seq[:, i] = (a * seq[:, i - 1] + b) % cfg.vocab
    noise = torch.rand(size, n, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, cfg.vocab, (size, n), generator=g), seq)
    return seq[:, :-1], seq[:, 1:]
