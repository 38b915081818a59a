"""Adapter for FlexAttention: any dense mask, as a block-sparse mask derived from it.

``create_block_mask`` scans the mask once per distinct mask (the plan caches the result) and the kernel
skips key blocks no query of a query block may attend. Causal masks — sliding windows and padded batches
included — get their block mask from the structure's formula (``block_mask_for``), no dense mask read. Used for masks without exploitable structure
(``General``), when forced or when ``autotune`` measures it faster than the dense masked SDPA. The
kernel is compiled once per shape (torch.compile), as FlexAttention is meant to run. A query row with no
allowed key gives 0 (FlexAttention's safe log-sum-exp), so flex is only used where the original gives 0.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attnfx.masks import Causal, MaskStructure, Padding


@functools.lru_cache(maxsize=1)
def _compiled():
    return torch.compile(flex_attention, dynamic=False)


def block_mask(allowed: torch.Tensor, q_len: int, kv_len: int):
    """A BlockMask standing for the bool mask ``allowed`` (batch or 1, 1, q_len, kv_len)."""
    dense = allowed.expand(allowed.shape[0], 1, q_len, kv_len).contiguous()
    per_batch = dense.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b if per_batch else 0, 0, q_idx, kv_idx]

    return create_block_mask(mask_mod, B=dense.shape[0] if per_batch else None, H=None, Q_LEN=q_len, KV_LEN=kv_len,
                             device=allowed.device)


def block_mask_for(structure: MaskStructure, q_len: int, kv_len: int, device):
    """A BlockMask standing for ``structure``: from its formula where it has one (causal, windowed, padded: key j
    for query i when j <= i + offset and, with a window w, j > i + offset - w, within the batch row's real keys),
    else from its dense mask."""
    if isinstance(structure, Causal):
        lengths, side, align = None, None, structure.align
    elif isinstance(structure, Padding) and structure.causal is not None:
        lengths = torch.tensor(structure.lengths, device=device)
        side, align = structure.side, structure.causal
    else:
        return block_mask(structure.materialize(q_len, kv_len, device), q_len, kv_len)
    off, window = (0 if align == "top_left" else kv_len - q_len), structure.window

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx + off
        if window is not None:
            ok = ok & (kv_idx > q_idx + off - window)
        if lengths is not None:
            ok = ok & ((kv_idx < lengths[b]) if side == "right" else (kv_idx >= kv_len - lengths[b]))
        return ok

    return create_block_mask(mask_mod, B=None if lengths is None else len(structure.lengths), H=None, Q_LEN=q_len,
                             KV_LEN=kv_len, device=device)


def nbytes(mask) -> int:
    """Memory a BlockMask holds: its block tables and the dense mask its ``mask_mod`` reads."""
    held = list(getattr(mask, "__dict__", {}).values())
    held += [c.cell_contents for c in (getattr(mask.mask_mod, "__closure__", None) or ())]
    seen, total = set(), 0
    for t in held:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def attention(q, k, v, mask, *, scale=None, enable_gqa=False):
    """softmax(q kᵀ·scale, masked to the BlockMask ``mask``) v."""
    fn = _compiled() if q.device.type == "cuda" else flex_attention
    return fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=enable_gqa)
