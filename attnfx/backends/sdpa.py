"""Adapter for ``torch.nn.functional.scaled_dot_product_attention`` (SDPA) and the kernels behind it.

SDPA picks its kernel at run time from the inputs. To know at compile time which kernel a site will
get, we ask PyTorch's own selector (``torch._fused_sdp_choice``) with small stand-in tensors that have
the site's device, dtype, head counts, head_dim, mask dtype and broadcast pattern, and gradient
requirement. The answer is then looked up in the capability table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from attnfx.fx.graph import fake, hint, sdpa_args

TARGET = "F.scaled_dot_product_attention"

_BACKEND_KERNEL = {
    "MATH": "sdpa.math",
    "FLASH_ATTENTION": "sdpa.flash",
    "EFFICIENT_ATTENTION": "sdpa.efficient",
    "CUDNN_ATTENTION": "sdpa.cudnn",
}


@dataclass(frozen=True)
class SdpaInputs:
    """What SDPA's kernel choice depends on, read off a site's FakeTensors (sizes as hints)."""

    device: torch.device
    dtype: torch.dtype
    batch: tuple[int, ...]
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    mask_shape: tuple[int, ...] | None
    mask_dtype: torch.dtype | None
    dropout_p: float
    is_causal: bool
    scale: float | None
    requires_grad: bool

    @classmethod
    def from_fakes(cls, q, k, v, mask, dropout_p=0.0, is_causal=False, scale=None) -> "SdpaInputs":
        return cls(
            device=q.device, dtype=q.dtype, batch=tuple(hint(s) for s in q.shape[:-3]),
            q_heads=hint(q.shape[-3]), kv_heads=hint(k.shape[-3]), q_len=hint(q.shape[-2]),
            kv_len=hint(k.shape[-2]), head_dim=hint(q.shape[-1]), v_head_dim=hint(v.shape[-1]),
            mask_shape=None if mask is None else tuple(hint(s) for s in mask.shape),
            mask_dtype=None if mask is None else mask.dtype,
            dropout_p=float(dropout_p) if isinstance(dropout_p, (int, float)) else 0.5,
            is_causal=bool(is_causal), scale=scale if isinstance(scale, (int, float)) else None,
            requires_grad=any(t.requires_grad for t in (q, k, v)),
        )

    def with_kv_heads(self, kv_heads) -> "SdpaInputs":
        return replace(self, kv_heads=hint(kv_heads))


def _stand_ins(x: SdpaInputs) -> tuple:
    """Small tensors SDPA's selector judges the same way as the site's real ones."""
    q_len = max(1, min(x.q_len, 64))
    kv_len = q_len if x.kv_len == x.q_len else max(1, min(x.kv_len, 64))
    batch = [min(b, 2) for b in x.batch]

    def make(heads: int, length: int, dim: int) -> torch.Tensor:
        return torch.zeros(*batch, heads, length, dim, device=x.device, dtype=x.dtype,
                           requires_grad=x.requires_grad)

    q = make(x.q_heads, q_len, x.head_dim)
    k = make(x.kv_heads, kv_len, x.head_dim)
    v = make(x.kv_heads, kv_len, x.v_head_dim)
    mask = None
    if x.mask_shape is not None:
        full = [*batch, x.q_heads, q_len, kv_len]
        shape = [1 if s == 1 else full[len(full) - len(x.mask_shape) + i] for i, s in enumerate(x.mask_shape)]
        mask = torch.zeros(shape, device=x.device, dtype=x.mask_dtype)
    return q, k, v, mask


def predict_kernel(x: SdpaInputs, *, enable_gqa: bool) -> str | None:
    """The capability-table name of the kernel SDPA would run for these inputs, or None if unknown."""
    choice = getattr(torch, "_fused_sdp_choice", None)
    if choice is None:
        return None
    dev = x.device
    if dev.type == "cuda" and not torch.cuda.is_available():
        return None
    try:
        q, k, v, mask = _stand_ins(x)
        idx = choice(q, k, v, mask, x.dropout_p, x.is_causal, scale=x.scale, enable_gqa=enable_gqa)
    except Exception:
        return None
    name = torch.nn.attention.SDPBackend(idx).name
    kernel = _BACKEND_KERNEL.get(name)
    if kernel == "sdpa.flash" and dev.type == "cpu":
        kernel = "sdpa.cpu_flash"
    return kernel


def describe_call(node) -> str:
    """A short description of an SDPA call node, for reports: which options it now uses."""
    args = sdpa_args(node)
    parts = []
    mask = args["attn_mask"]
    if mask is not None:
        m = fake(mask)
        parts.append(f"attn_mask={'bool' if m.dtype == torch.bool else 'float'}")
    if args["is_causal"]:
        parts.append("is_causal=True")
    if args["enable_gqa"]:
        parts.append("enable_gqa=True")
    return f"{TARGET}({', '.join(parts)})"
