"""The random-sign Hadamard rotation the FP8 targets apply to Q and K (shared by the NPU and cuDNN adapters).

diag(r)·H with H the Sylvester Hadamard matrix and r random signs (a fixed seed: the same rotation in every
process). It is orthogonal up to its norm — (x·R)(y·R)ᵀ = dim · x·yᵀ — so rotating Q and K leaves the
attention logits unchanged, while it spreads a few large channels (outliers) over all of them, which is what
per-tensor or per-block FP8 scales need. ``normalized=True`` divides by √dim (exactly orthogonal in float32);
``normalized=False`` keeps the ±1 entries, which every float dtype holds exactly (1/√dim is not exact in
bfloat16: the rotation would then scale the logits by (1 + ε)²), and leaves the factor dim to the caller.
"""

from __future__ import annotations

import functools
import math

import torch


def sylvester(n: int) -> torch.Tensor:
    """The n×n Sylvester Hadamard matrix (entries ±1), n a power of two."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=32)
def hadamard(dim: int, device: str, dtype: torch.dtype, seed: int = 0, normalized: bool = True) -> torch.Tensor:
    """diag(r)·H (/√dim when ``normalized``) with random signs r. Cached per (dim, device, dtype, ...): an
    invariant."""
    if dim <= 0 or dim & (dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two head_dim, not {dim}")
    signs = torch.randint(0, 2, (dim,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    rot = signs[:, None] * sylvester(dim)
    if normalized:
        rot = rot / math.sqrt(dim)
    return rot.to(device=device, dtype=dtype)
