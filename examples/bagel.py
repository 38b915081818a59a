"""Bagel's denoising attention with packed CFG branches, reproduced, optimized by attnfx unmodified.

    python examples/bagel.py
    attnfx report examples/bagel.py:make

Bagel (28 query heads, 4 K/V heads, head_dim 128) packs the classifier-free-guidance branches of one
denoising step — cond, cfg_text (an empty or short text prefix), cfg_img — into one sequence. The
image tokens of each branch may see only that branch's cached prefix and its own image tokens: the
attention is block-diagonal over (branch queries) × (branch prefix + branch image keys), with a
different key length per branch. Flattening the branches into one unmasked SDPA call lets branches
attend to each other — a real bug of naive batched ports. Here the attention is written the correct
slow way: K/V heads copied with Bagel's grouped ``.repeat`` and a dense block-diagonal bool mask built in
``forward``; attnfx reads the mask at compile time and runs the blocks without it (varlen on CUDA,
one SDPA call per branch elsewhere).
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfx


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


class BagelPackedAttention(nn.Module):
    def __init__(self, hidden: int = 3584, heads: int = 28, kv_heads: int = 4, head_dim: int = 128):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)

    def forward(self, x, prefix_k, prefix_v, image_lens: tuple[int, ...], prefix_lens: tuple[int, ...]):
        """x: (sum(image_lens), hidden) packed image tokens of the branches; prefix_k/v: (sum(prefix_lens),
        kv_heads, head_dim) the branches' cached prefixes, packed."""
        n_rep = self.heads // self.kv_heads
        q = self.q_norm(self.q_proj(x).view(-1, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(-1, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(-1, self.kv_heads, self.head_dim)
        keys, values, q0, p0 = [], [], 0, 0
        for n, p in zip(image_lens, prefix_lens):
            keys += [prefix_k[p0:p0 + p], k[q0:q0 + n]]
            values += [prefix_v[p0:p0 + p], v[q0:q0 + n]]
            q0, p0 = q0 + n, p0 + p
        keys, values = torch.cat(keys), torch.cat(values)
        # Bagel's training-code spelling of the K/V head expansion (grouped)
        keys = keys[:, :, None, :].repeat(1, 1, n_rep, 1).reshape(-1, self.heads, self.head_dim)
        values = values[:, :, None, :].repeat(1, 1, n_rep, 1).reshape(-1, self.heads, self.head_dim)
        mask = torch.zeros(q.shape[0], keys.shape[0], dtype=torch.bool, device=x.device)
        q0 = k0 = 0
        for n, p in zip(image_lens, prefix_lens):
            mask[q0:q0 + n, k0:k0 + p + n] = True  # a branch sees its own prefix and image tokens only
            q0, k0 = q0 + n, k0 + p + n
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                             values.transpose(0, 1)[None], attn_mask=mask)
        return self.o_proj(out[0].transpose(0, 1).reshape(q.shape[0], -1))


SMALL = dict(hidden=128, heads=8, kv_heads=2, head_dim=16)


def make(image_len: int = 24, prefix_lens: tuple[int, ...] = (12, 0, 7), size: dict = SMALL, device=None,
         dtype=torch.float32):
    """(model, args, kwargs): cond, cfg_text (empty prefix) and cfg_img branches packed."""
    torch.manual_seed(0)
    model = BagelPackedAttention(**size).to(device, dtype).eval()
    branches = len(prefix_lens)
    x = torch.randn(branches * image_len, size["hidden"], device=device, dtype=dtype)
    pk = torch.randn(sum(prefix_lens), size["kv_heads"], size["head_dim"], device=device, dtype=dtype)
    pv = torch.randn_like(pk)
    return model, (x, pk, pv, (image_len,) * branches, tuple(prefix_lens)), {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compiler", default="eager", choices=["eager", "inductor"])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, inputs, kwargs = make()
    opt = attnfx.optimize(model, compiler=args.compiler, verify=True)
    with torch.no_grad():
        err = (opt(*inputs, **kwargs) - model(*inputs, **kwargs)).abs().max().item()
    print(f"max |optimized - original|: {err:.2e}\n")
    print(attnfx.report(opt))


if __name__ == "__main__":
    main()
