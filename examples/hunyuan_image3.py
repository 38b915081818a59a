"""HunyuanImage-3.0's attention, reproduced faithfully, optimized by attnfx without touching its code.

    python examples/hunyuan_image3.py            # small config on CPU: a 4-step denoising loop + report
    attnfx report examples/hunyuan_image3.py:make_step2
    attnfx report examples/hunyuan_image3.py:make_step1_image_rows

What the real model does in one attention layer (hidden 4096, 32 query heads, 8 K/V heads, head_dim 128):
  * one fused qkv projection whose output is viewed (B, L, 8, 4 + 2, 128) and split [4, 1, 1]: grouped
    head order (query head h uses K/V head h // 4);
  * RoPE on q and k, then per-head RMSNorm on q and k;
  * a static KV cache written with ``index_copy_``;
  * ``repeat_kv`` (expand + reshape), ``.contiguous()``, and
    ``F.scaled_dot_product_attention(q, k, v, attn_mask=bool (B, 1, Q, S))`` with the default scale;
  * classifier-free guidance as a batch of 2 (cond, uncond).
Token layout: ``[text… <boi> <size> <ratio> <timestep> <img>×N <eoi>]``; T tokens before ``<timestep>``.
  * Step 1 attends over all S = T + N + 2 tokens: causal, plus a full N×N block over the image tokens;
    only image outputs are read (``masked_select``).
  * Steps 2..50 run only [timestep, image×N] as queries (1 + N rows) against the cache; the mask is
    those rows of the step-1 mask with the ``<eoi>`` column False (its cached K/V are stale); the same
    mask tensor serves every later step and layer; outputs are read with ``x[:, 1:]``.

attnfx finds, with no hint: the K/V expansion (gqa → SDPA reads the 8 cached K/V heads), and the mask's
structure (mask_structure → at step ≥ 2 two unmasked calls, timestep→prefix and image→all; at step 1
three: causal text, image rows, the EOI row), and when only the image outputs are read (dead_tokens → at
step 1 the text and EOI rows and the EOI key are not computed, nor their RoPE, norm and o_proj).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfx


@dataclass(frozen=True)
class Config:
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    max_len: int = 8192
    rope_theta: float = 10000.0

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads


SMALL = Config(hidden=128, heads=8, kv_heads=2, head_dim=16, max_len=256)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class HunyuanImage3Attention(nn.Module):
    def __init__(self, cfg: Config, batch: int = 2):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = nn.Linear(cfg.hidden, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)
        self.query_layernorm = RMSNorm(cfg.head_dim)
        self.key_layernorm = RMSNorm(cfg.head_dim)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("k_cache", torch.zeros(batch, cfg.kv_heads, cfg.max_len, cfg.head_dim), persistent=False)
        self.register_buffer("v_cache", torch.zeros(batch, cfg.kv_heads, cfg.max_len, cfg.head_dim), persistent=False)

    def rope(self, positions: torch.Tensor, dtype):
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[None, :, None, :], emb.sin().to(dtype)[None, :, None, :]

    def forward(self, hidden_states, attention_mask, cache_position, kv_len: int):
        cfg = self.cfg
        b, q_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(b, q_len, cfg.kv_heads, cfg.n_rep + 2, cfg.head_dim)
        q, k, v = torch.split(qkv, [cfg.n_rep, 1, 1], dim=3)
        q = q.reshape(b, q_len, cfg.heads, cfg.head_dim)
        k = k.reshape(b, q_len, cfg.kv_heads, cfg.head_dim)
        v = v.reshape(b, q_len, cfg.kv_heads, cfg.head_dim)
        cos, sin = self.rope(cache_position, q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q = self.query_layernorm(q).transpose(1, 2)
        k = self.key_layernorm(k).transpose(1, 2)
        v = v.transpose(1, 2)
        self.k_cache.index_copy_(2, cache_position, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, cache_position, v.to(self.v_cache.dtype))
        key_states = repeat_kv(self.k_cache[:, :, :kv_len], cfg.n_rep).contiguous()
        value_states = repeat_kv(self.v_cache[:, :, :kv_len], cfg.n_rep).contiguous()
        attn = F.scaled_dot_product_attention(q.contiguous(), key_states, value_states, attn_mask=attention_mask)
        attn = attn.transpose(1, 2).reshape(b, q_len, cfg.heads * cfg.head_dim)
        return self.o_proj(attn)


def step1_mask(text_len: int, num_image: int, batch: int = 2, device=None) -> torch.Tensor:
    """Causal over all S tokens, plus the full block over the image tokens. (B, 1, S, S) bool."""
    s = text_len + num_image + 2
    mask = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    img = slice(text_len + 1, text_len + 1 + num_image)
    mask[img, img] = True
    return mask[None, None].expand(batch, 1, s, s).contiguous()


def later_steps_mask(text_len: int, num_image: int, batch: int = 2, device=None) -> torch.Tensor:
    """Rows [timestep, image×N] of the step-1 mask, with the <eoi> column False. (B, 1, 1 + N, S) bool."""
    mask = step1_mask(text_len, num_image, batch, device)[:, :, text_len:text_len + 1 + num_image].clone()
    mask[..., -1] = False
    return mask


def image_mask(text_len: int, num_image: int, batch: int = 2, device=None) -> torch.Tensor:
    s = text_len + num_image + 2
    m = torch.zeros(batch, s, dtype=torch.bool, device=device)
    m[:, text_len + 1:text_len + 1 + num_image] = True
    return m


def make(cfg: Config = SMALL, text_len: int = 20, num_image: int = 64, batch: int = 2, device=None, dtype=None):
    torch.manual_seed(0)
    attn = HunyuanImage3Attention(cfg, batch).to(device=device)
    if dtype is not None:
        attn = attn.to(dtype)
    return attn.eval()


def make_step1(cfg: Config = SMALL, text_len: int = 20, num_image: int = 64):
    """CLI factory: (model, args, kwargs) for step 1."""
    attn = make(cfg, text_len, num_image)
    s = text_len + num_image + 2
    x = torch.randn(2, s, cfg.hidden)
    return attn, (x, step1_mask(text_len, num_image), torch.arange(s), s), {}


class ImageRows(nn.Module):
    """Step 1 as the pipeline uses it: only the image tokens' outputs are read."""

    def __init__(self, attn: HunyuanImage3Attention, text_len: int, num_image: int):
        super().__init__()
        self.attn, self.start, self.stop = attn, text_len + 1, text_len + 1 + num_image

    def forward(self, hidden_states, attention_mask, cache_position, kv_len: int):
        return self.attn(hidden_states, attention_mask, cache_position, kv_len)[:, self.start:self.stop]


def make_step1_image_rows(cfg: Config = SMALL, text_len: int = 20, num_image: int = 64):
    """CLI factory: step 1 reading only the image rows (dead_tokens drops the others and the EOI key)."""
    attn, args, kwargs = make_step1(cfg, text_len, num_image)
    return ImageRows(attn, text_len, num_image), args, kwargs


def make_step2(cfg: Config = SMALL, text_len: int = 20, num_image: int = 64):
    """CLI factory: (model, args, kwargs) for a step >= 2 (cache filled by a step 1 first)."""
    attn, (x, mask, pos, s), _ = make_step1(cfg, text_len, num_image)
    with torch.no_grad():
        attn(x, mask, pos, s)
    q = torch.randn(2, 1 + num_image, cfg.hidden)
    return attn, (q, later_steps_mask(text_len, num_image), torch.arange(text_len, text_len + 1 + num_image), s), {}


def denoise(attn, text_len, num_image, steps, device=None, dtype=torch.float32, seed=0):
    """Step 1 over every token, then steps 2..``steps`` over [timestep, image×N]; returns the image outputs."""
    cfg = attn.cfg
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = text_len + num_image + 2
    outs = []
    x = torch.randn(2, s, cfg.hidden, generator=g).to(device, dtype)
    y = attn(x, step1_mask(text_len, num_image, 2, device), torch.arange(s, device=device), s)
    outs.append(y.masked_select(image_mask(text_len, num_image, 2, device)[..., None]).view(2, num_image, -1))
    mask = later_steps_mask(text_len, num_image, 2, device)  # the same tensor for every later step
    pos = torch.arange(text_len, text_len + 1 + num_image, device=device)
    for _ in range(steps - 1):
        x = torch.randn(2, 1 + num_image, cfg.hidden, generator=g).to(device, dtype)
        outs.append(attn(x, mask, pos, s)[:, 1:])
    return outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-len", type=int, default=20)
    p.add_argument("--num-image", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compiler", default="eager", choices=["eager", "inductor"])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    original = make(SMALL)
    optimized_model = make(SMALL)
    optimized = attnfx.optimize(optimized_model, compiler=args.compiler, verify=True)
    with torch.no_grad():
        expected = denoise(original, args.text_len, args.num_image, args.steps)
        start = time.perf_counter()
        actual = denoise(optimized, args.text_len, args.num_image, args.steps)
        print(f"optimized loop (compile included): {time.perf_counter() - start:.1f}s")
    err = max((a - e).abs().max().item() for a, e in zip(actual, expected))
    print(f"max |optimized - original| over {args.steps} steps: {err:.2e}\n")
    print(attnfx.report(optimized))


if __name__ == "__main__":
    main()
