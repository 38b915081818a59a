"""Pure-PyTorch reference attention: the definition the other kernels are tested against (CPU or GPU).

Computed in float32 (or float64) with explicit masks, so it is slow and obviously right.
"""

from __future__ import annotations

import torch


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[-3], dim=-3) if x.shape[-3] != heads else x


def attention(q, k, v, allowed=None, *, scale=None, fill: str = "zero"):
    """softmax(q kᵀ · scale, masked to ``allowed``) v, GQA by head grouping; rows with no allowed key
    give ``fill``: "zero", "nan" or "mean_v" (uniform weights over all keys)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads = q.shape[-3]
    kf, vf = _expand_kv(k, heads).to(acc), _expand_kv(v, heads).to(acc)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.to(acc) @ kf.transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1)
    out = p.nan_to_num(0.0) @ vf
    if allowed is not None:
        empty = ~allowed.any(-1, keepdim=True)
        if fill == "nan":
            out = out.masked_fill(empty, float("nan"))
        elif fill == "mean_v":
            out = torch.where(empty, vf.mean(-2, keepdim=True), out)
    return out.to(q.dtype)


def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, causal=False, scale=None, seqused_k=None, window_size=(-1, -1)):
    """Packed sequences (total, heads, d); sequence i is rows cu_q[i]:cu_q[i+1] against cu_k[i]:cu_k[i+1]
    (only the first seqused_k[i] keys, if given). FlashAttention's semantics: query row r of a sequence with
    lq queries and n keys has its diagonal at key ``r + n - lq`` (bottom-right aligned — with seqused_k, to the
    used keys, as measured on H200, torch 2.11); ``causal`` allows keys up to it, and ``window_size=(left,
    right)`` only keys in ``[diagonal - left, diagonal + right]`` (-1: unbounded on that side; causal makes
    right 0). So HF's ``sliding_window=w`` (j > i - w and j <= i) is ``causal, window_size=(w - 1, 0)``."""
    left, right = window_size
    if causal:
        right = 0
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    cq, ck = cu_q.tolist(), cu_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else None
    for i in range(len(cq) - 1):
        qs, ks = q[cq[i]:cq[i + 1]].transpose(0, 1), k[ck[i]:ck[i + 1]].transpose(0, 1)
        vs = v[ck[i]:ck[i + 1]].transpose(0, 1)
        lq, lk = qs.shape[1], ks.shape[1]
        if lq == 0:
            continue
        n = lk if used is None else used[i]
        key = torch.arange(lk, device=q.device)[None, :]
        offset = key - (torch.arange(lq, device=q.device)[:, None] + n - lq)  # key index minus the diagonal
        allowed = key < n
        if right >= 0:
            allowed = allowed & (offset <= right)
        if left >= 0:
            allowed = allowed & (offset >= -left)
        out[cq[i]:cq[i + 1]] = attention(qs, ks, vs, allowed, scale=scale).transpose(0, 1)
    return out
