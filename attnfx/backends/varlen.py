"""Adapter for variable-length (packed) FlashAttention: q (total_q, Hq, D), k/v (total_k, Hkv, D) with
cumulative sequence offsets; causal is bottom-right aligned per sequence. K/V may have fewer heads.

Implementations, best first where available (see the capability table):
  ``flash_attn``        flash-attn's ``flash_attn_varlen_func`` (optional dependency);
  ``torch.varlen``      ``torch.nn.attention.varlen.varlen_attn`` — 2.10: ``is_causal=``; 2.11:
                        ``window_size=(-1, 0)`` for causal; 2.12+: also ``enable_gqa``;
  ``aten.flash``        ``torch.ops.aten._flash_attention_forward`` (takes fewer K/V heads directly);
  ``reference``         pure PyTorch (CPU and tests).

Sliding windows (``window=w``, with causal: each query row sees the ``w`` keys ending at its diagonal, HF's
``sliding_window``) are FlashAttention's ``window_size=(w - 1, 0)`` — its window counts the keys *before* the
diagonal. flash-attn (>= 2.3) takes ``window_size=``, ``varlen_attn`` ``window_size=`` from torch 2.11 (its
``is_causal`` is only ``window_size == (-1, 0)``), ``aten._flash_attention_forward`` ``window_size_left/right``
(both passed, as ``varlen_attn`` does); ``supports_window`` reads which of them this install has.
"""

from __future__ import annotations

import functools
import inspect

import torch

from attnfx.backends import reference


@functools.lru_cache(maxsize=None)
def _torch_varlen_params() -> frozenset[str] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


def implementations(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The varlen implementations usable for this device and dtype, best first."""
    impls = []
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _flash_attn() is not None:
            impls.append("flash_attn")
        if _torch_varlen_params() is not None:
            impls.append("torch.varlen")
        if hasattr(torch.ops.aten, "_flash_attention_forward"):
            impls.append("aten.flash")
    impls.append("reference")
    return impls


@functools.lru_cache(maxsize=None)
def supports_window(impl: str) -> bool:
    """Whether this install's ``impl`` takes a sliding window."""
    if impl == "reference":
        return True
    if impl == "torch.varlen":
        return "window_size" in (_torch_varlen_params() or ())
    if impl == "aten.flash":
        op = getattr(torch.ops.aten, "_flash_attention_forward", None)
        return op is not None and "window_size_left" in {a.name for a in op.default._schema.arguments}
    if impl == "flash_attn":
        fn = _flash_attn()
        return fn is not None and "window_size" in inspect.signature(fn).parameters
    return False


def supports_seqused_k(impl: str) -> bool:
    """Whether ``impl`` takes ``seqused_k`` (keys of sequence i: only the first seqused_k[i] are used)."""
    if impl in ("reference", "aten.flash"):
        return True
    if impl == "torch.varlen":
        return "seqused_k" in (_torch_varlen_params() or ())
    return False


def varlen_attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, causal: bool, scale: float | None,
                     impl: str, seqused_k: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """``window``: with causal, each query row sees only the ``window`` keys ending at its diagonal."""
    if window is not None and not causal:
        raise ValueError("a sliding window is causal")
    if window is not None and not supports_window(impl):
        raise ValueError(f"varlen implementation {impl!r} takes no sliding window here")
    left = -1 if window is None else window - 1  # FlashAttention counts the keys before the diagonal
    if impl == "reference":
        return reference.varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale, seqused_k=seqused_k,
                                window_size=(left, 0 if causal else -1))
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    if seqused_k is not None and impl == "torch.varlen" and not supports_seqused_k(impl):
        impl = "aten.flash"
    if impl == "flash_attn":
        if seqused_k is not None:
            raise ValueError("flash_attn_varlen_func takes no seqused_k")
        kw = {"window_size": (left, 0)} if window is not None else {}
        return _flash_attn()(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal, **kw)
    if impl == "aten.flash":
        kw = {"seqused_k": seqused_k.to(torch.int32)} if seqused_k is not None else {}
        if window is not None:  # as varlen_attn calls it: not "causal", a (left, 0) window
            return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False,
                                                           scale=scale, window_size_left=left, window_size_right=0,
                                                           **kw)[0]
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                       scale=scale, **kw)[0]
    if impl == "torch.varlen":
        from torch.nn.attention.varlen import varlen_attn

        params = _torch_varlen_params()
        if scale is not None and "scale" not in params:  # torch 2.10 takes no scale
            return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale, impl="aten.flash",
                                    window=window)
        kwargs = {"scale": scale} if scale is not None else {}
        if "enable_gqa" in params and k.shape[1] != q.shape[1]:
            kwargs["enable_gqa"] = True
        if seqused_k is not None:
            kwargs["seqused_k"] = seqused_k.to(torch.int32)
        if window is not None:
            kwargs["window_size"] = (left, 0)
        elif "is_causal" in params:
            kwargs["is_causal"] = causal
        elif causal:
            kwargs["window_size"] = (-1, 0)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    raise ValueError(f"unknown varlen implementation {impl!r}")
