"""Adapter for Ascend NPU fused attention: ``torch_npu.npu_fused_infer_attention_score_v2`` (falling back to
``npu_fused_infer_attention_score`` where v2 is missing), native or with online FP8 quantization.

Contract (torch_npu docs; the FP8 mode as vllm-omni #2640 uses it):
  * layouts: q/k/v in BNSD (SDPA's own layout, no copy beyond ``.contiguous()``), GQA through
    ``num_key_value_heads``; ``softmax_scale`` always passed (the op's default is 1.0, not 1/√d);
  * ``atten_mask`` is bool with the opposite polarity of SDPA's: True = *not* attended; a causal mask is
    ``sparse_mode`` 2 (top-left) / 3 (bottom-right) with the 2048×2048 upper-triangular mask; a general
    additive bias goes to ``pse_shift``; rows with no allowed key: ``inner_precise=2`` (row-invalid
    correction), which gives them 0;
  * FP8 (``query/key/value_quant_mode=7``): Q and K first multiplied by a random-sign Hadamard rotation
    diag(r)·H/√D (``attnfx.backends.hadamard``, shared with the cuDNN FP8 target) — orthogonal, so Q·Kᵀ is
    unchanged —, then Q quantized in 128-token blocks and K/V in
    256-token blocks to ``float8_e4m3fn`` with one float32 scale per (batch, head, block) = amax/448; the
    sequences padded to the block size (padded keys excluded through ``actual_seq_kvlen``) and the output
    cropped and cast back to the model's dtype.
Nothing here imports torch_npu until an NPU target is requested.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch

from attnfx.backends.hadamard import hadamard
from attnfx.masks import BlockDiagonal, Causal, Padding

Q_BLOCK, KV_BLOCK, FP8_MAX = 128, 256, 448.0
CAUSAL_MASK_SIZE = 2048


class NpuUnavailable(RuntimeError):
    pass


def load():
    """The torch_npu module, or NpuUnavailable saying why."""
    try:
        mod = importlib.import_module("torch_npu")
    except Exception as e:  # torch_npu needs Huawei's CANN runtime to import
        raise NpuUnavailable(f"torch_npu is not importable ({type(e).__name__}: {e})") from None
    if not (hasattr(mod, "npu_fused_infer_attention_score_v2") or hasattr(mod, "npu_fused_infer_attention_score")):
        raise NpuUnavailable("torch_npu has neither npu_fused_infer_attention_score_v2 nor npu_fused_infer_attention_score")
    return mod


def quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, N, S, D) -> fp8 (B, N, S_pad, D), float32 scales (B, N, S_pad / block), S (unpadded)."""
    b, n, s, d = x.shape
    pad = (-s) % block
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
    blocks = xp.view(b, n, -1, block, d)
    scale = (blocks.abs().amax(dim=(-1, -2)) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (blocks / scale[..., None, None]).to(torch.float8_e4m3fn).view(b, n, -1, d)
    return q, scale, s


@dataclass
class Call:
    """What the adapter passed to the op (for the report and the tests)."""

    op: str
    layout: str
    quantized: bool
    sparse_mode: int


def structured(structure, batch: int, q_len: int, kv_len: int) -> dict | None:
    """How the op takes a mask structure without a dense mask: {"causal"} / {"kv_lengths"} / {"packed"}."""
    if isinstance(structure, Causal) and structure.window is None and (structure.align == "top_left" or kv_len >= q_len):
        return {"causal": structure.align}
    if isinstance(structure, Padding) and structure.side == "right" and structure.causal is None and all(structure.lengths):
        return {"kv_lengths": list(structure.lengths)}
    if isinstance(structure, BlockDiagonal) and batch == 1 and all(structure.q_seqlens) and all(structure.kv_seqlens):
        return {"packed": structure}
    return None


def _packed(mod, q, k, v, blocks, kwargs) -> tuple[torch.Tensor, Call]:
    """Packed sequences of one batch row: TND layout, cumulative actual_seq_qlen / actual_seq_kvlen."""
    cum = lambda xs: [sum(xs[:i + 1]) for i in range(len(xs))]  # noqa: E731
    kwargs = {k_: v_ for k_, v_ in kwargs.items() if k_ not in ("atten_mask", "inner_precise")}
    kwargs.update(input_layout="TND", actual_seq_qlen=cum(list(blocks.q_seqlens)),
                  actual_seq_kvlen=cum(list(blocks.kv_seqlens)), sparse_mode=3 if blocks.causal else 0)
    if blocks.causal:
        kwargs["atten_mask"] = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=q.device).triu(1)
    t = lambda x: x[0].transpose(0, 1).contiguous()  # noqa: E731  (1, N, T, D) -> (T, N, D)
    out, _ = mod.npu_fused_infer_attention_score_v2(t(q), t(k), t(v), **kwargs)
    return out.transpose(0, 1)[None], Call("npu_fused_infer_attention_score_v2", "TND", False, kwargs["sparse_mode"])


def attention(q, k, v, *, allowed=None, bias=None, causal: str | None = None, scale: float | None = None,
              fp8: bool = False, structure=None) -> tuple[torch.Tensor, Call]:
    """softmax(q kᵀ·scale + mask) v on the NPU op. q (B, N, Sq, D), k/v (B, Nkv, Sk, D); ``allowed`` is an
    SDPA-polarity bool mask (True = attend), ``bias`` an additive float mask; causal top_left/bottom_right;
    ``structure`` (from ``attnfx.masks.classify``) lets the op skip the dense mask where it can."""
    mod = load()
    plan = structured(structure, q.shape[0], q.shape[2], k.shape[2]) if structure is not None and bias is None else None
    if plan is not None and "causal" in plan:
        causal, allowed = plan["causal"], None
    b, n, sq, d = q.shape
    nkv, sk = k.shape[1], k.shape[2]
    out_dtype = q.dtype
    kwargs = dict(num_query_heads=n, num_key_value_heads=nkv, input_layout="BNSD",
                  softmax_scale=float(scale if scale is not None else 1.0 / math.sqrt(d)))
    if fp8 and causal == "bottom_right":  # padded to blocks, the op's bottom-right alignment would shift
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)[None, None]
        causal = None
    sparse_mode = 0
    if causal is not None:
        sparse_mode = 2 if causal == "top_left" else 3
        kwargs["atten_mask"] = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool,
                                          device=q.device).triu(1)
    elif allowed is not None:
        kwargs["atten_mask"] = ~allowed  # NPU polarity: True = not attended
        kwargs["inner_precise"] = 2  # row-invalid correction: a row with no allowed key gives 0
    if bias is not None:
        kwargs["pse_shift"] = bias.expand(bias.shape[0], n, sq, sk).to(out_dtype).contiguous()
    kwargs["sparse_mode"] = sparse_mode
    v2 = hasattr(mod, "npu_fused_infer_attention_score_v2")
    if plan is not None and not fp8 and v2:
        if "packed" in plan:
            return _packed(mod, q.contiguous(), k.contiguous(), v.contiguous(), plan["packed"], kwargs)
        if "kv_lengths" in plan:
            kwargs.pop("atten_mask", None)
            kwargs.pop("inner_precise", None)
            kwargs["actual_seq_kvlen"] = plan["kv_lengths"]
    if fp8 and not v2:
        raise NpuUnavailable("FP8 attention needs npu_fused_infer_attention_score_v2")
    if fp8:
        rot = hadamard(d, str(q.device), torch.float32)
        qq, q_scale, _ = quantize_blocks(q.float() @ rot, Q_BLOCK)
        kq, k_scale, _ = quantize_blocks(k.float() @ rot, KV_BLOCK)
        vq, v_scale, _ = quantize_blocks(v, KV_BLOCK)
        if "atten_mask" in kwargs and sparse_mode == 0:
            m = kwargs["atten_mask"]
            m = m.expand(*m.shape[:-2], sq, sk)
            kwargs["atten_mask"] = torch.nn.functional.pad(m, (0, kq.shape[2] - sk, 0, qq.shape[2] - sq), value=True)
        if "pse_shift" in kwargs:
            kwargs["pse_shift"] = torch.nn.functional.pad(kwargs["pse_shift"], (0, kq.shape[2] - sk, 0, qq.shape[2] - sq))
        kwargs.update(dequant_scale_query=q_scale, dequant_scale_key=k_scale, dequant_scale_value=v_scale,
                      query_quant_mode=7, key_quant_mode=7, value_quant_mode=7,
                      actual_seq_qlen=[sq] * b, actual_seq_kvlen=[sk] * b)
        out, _ = mod.npu_fused_infer_attention_score_v2(qq, kq, vq, **kwargs)
        return out[:, :, :sq].to(out_dtype), Call("npu_fused_infer_attention_score_v2", "BNSD", True, sparse_mode)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if v2:
        out, _ = mod.npu_fused_infer_attention_score_v2(q, k, v, **kwargs)
        return out, Call("npu_fused_infer_attention_score_v2", "BNSD", False, sparse_mode)
    legacy = dict(kwargs)
    legacy["num_heads"] = legacy.pop("num_query_heads")
    legacy["scale"] = legacy.pop("softmax_scale")
    out, _ = mod.npu_fused_infer_attention_score(q, k, v, **legacy)
    return out, Call("npu_fused_infer_attention_score", "BNSD", False, sparse_mode)
