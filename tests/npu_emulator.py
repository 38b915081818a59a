"""A CPU emulator of torch_npu's fused infer attention ops, following their documented contract, for tests.

Installed as ``sys.modules["torch_npu"]``. It checks what the real op checks (dtypes, head counts, mask
polarity and shapes per sparse mode, FP8 per-block scale shapes), computes in float32, and records every
call in ``CALLS`` so tests can assert the exact arguments attnfx passes.
"""

from __future__ import annotations

import importlib.machinery
import types

import torch

CALLS: list[dict] = []
Q_BLOCK, KV_BLOCK = 128, 256


def _to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout.startswith("BNSD"):
        return x
    if layout.startswith("BSND"):
        return x.transpose(1, 2)
    if layout.startswith("BSH"):
        b, s, h = x.shape
        return x.view(b, s, heads, h // heads).transpose(1, 2)
    raise NotImplementedError(f"emulator: layout {layout}")


def _dequant(x, scale, block, name):
    b, n, s, d = x.shape
    assert x.dtype == torch.float8_e4m3fn, f"{name}: quant mode 7 takes float8_e4m3fn, got {x.dtype}"
    assert s % block == 0, f"{name}: sequence {s} not padded to the {block}-token block"
    assert scale is not None and scale.dtype == torch.float32, f"{name}: float32 per-block scale required"
    assert tuple(scale.shape) == (b, n, s // block), f"{name}: scale shape {tuple(scale.shape)} != {(b, n, s // block)}"
    return x.float() * scale.repeat_interleave(block, dim=-1)[..., None]


def npu_fused_infer_attention_score_v2(query, key, value, *, atten_mask=None, pse_shift=None, actual_seq_qlen=None,
                                       actual_seq_kvlen=None, dequant_scale_query=None, dequant_scale_key=None,
                                       dequant_scale_value=None, num_query_heads=1, num_key_value_heads=0,
                                       softmax_scale=1.0, input_layout="BSH", sparse_mode=0, query_quant_mode=0,
                                       key_quant_mode=0, value_quant_mode=0, inner_precise=0, **rest):
    CALLS.append(dict(op="v2", query=query, key=key, value=value, atten_mask=atten_mask, pse_shift=pse_shift,
                      actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                      dequant_scale_query=dequant_scale_query, dequant_scale_key=dequant_scale_key,
                      dequant_scale_value=dequant_scale_value, num_query_heads=num_query_heads,
                      num_key_value_heads=num_key_value_heads, softmax_scale=softmax_scale, input_layout=input_layout,
                      sparse_mode=sparse_mode, query_quant_mode=query_quant_mode, key_quant_mode=key_quant_mode,
                      value_quant_mode=value_quant_mode, inner_precise=inner_precise, rest=rest))
    if input_layout == "TND":
        return _tnd(query, key, value, actual_seq_qlen, actual_seq_kvlen, num_query_heads, num_key_value_heads,
                    softmax_scale, sparse_mode, atten_mask)
    return _attention(query, key, value, atten_mask, pse_shift, actual_seq_kvlen, dequant_scale_query,
                      dequant_scale_key, dequant_scale_value, num_query_heads, num_key_value_heads, softmax_scale,
                      input_layout, sparse_mode, (query_quant_mode, key_quant_mode, value_quant_mode), inner_precise)


def _tnd(query, key, value, cum_q, cum_k, n, nkv, scale, sparse_mode, atten_mask):
    """TND: sequence i is rows cum_q[i-1]:cum_q[i] against keys cum_k[i-1]:cum_k[i] (cumulative lengths)."""
    assert cum_q is not None and cum_k is not None and len(cum_q) == len(cum_k), "TND needs both cumulative lengths"
    assert list(cum_q) == sorted(cum_q) and cum_q[-1] == query.shape[0] and cum_k[-1] == key.shape[0]
    assert sparse_mode in (0, 3), f"emulator: TND with sparse_mode {sparse_mode}"
    out = torch.empty(query.shape[0], n, value.shape[-1], dtype=query.dtype)
    q0 = k0 = 0
    for q1, k1 in zip(cum_q, cum_k):
        o, _ = _attention(query[q0:q1].transpose(0, 1)[None], key[k0:k1].transpose(0, 1)[None],
                          value[k0:k1].transpose(0, 1)[None], atten_mask, None, None, None, None, None, n, nkv, scale,
                          "BNSD", sparse_mode, (0, 0, 0), 0)
        out[q0:q1] = o[0].transpose(0, 1)
        q0, k0 = q1, k1
    return out, torch.zeros(1)


def _attention(query, key, value, atten_mask, pse_shift, actual_seq_kvlen, dequant_scale_query, dequant_scale_key,
               dequant_scale_value, num_query_heads, num_key_value_heads, softmax_scale, input_layout, sparse_mode,
               quant, inner_precise):
    nkv = num_key_value_heads or num_query_heads
    q, k, v = (_to_bnsd(t, input_layout, h) for t, h in ((query, num_query_heads), (key, nkv), (value, nkv)))
    if quant == (7, 7, 7):
        q = _dequant(q, dequant_scale_query, Q_BLOCK, "query")
        k = _dequant(k, dequant_scale_key, KV_BLOCK, "key")
        v = _dequant(v, dequant_scale_value, KV_BLOCK, "value")
        out_dtype = torch.bfloat16
    else:
        assert quant == (0, 0, 0), f"emulator: quant modes {quant}"
        assert query.dtype in (torch.float16, torch.bfloat16), f"query dtype {query.dtype}: the op takes fp16/bf16"
        out_dtype = query.dtype
        q, k, v = q.float(), k.float(), v.float()
    b, n, sq, d = q.shape
    assert n == num_query_heads and k.shape[1] == nkv and n % nkv == 0, "head counts do not match the tensors"
    assert n // nkv <= 64, "num_query_heads / num_key_value_heads must be <= 64"
    k, v = k.repeat_interleave(n // nkv, 1), v.repeat_interleave(n // nkv, 1)
    sk = k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * softmax_scale
    if pse_shift is not None:
        scores = scores + pse_shift.float()
    masked = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
    if sparse_mode in (2, 3):
        assert atten_mask is not None and tuple(atten_mask.shape) == (2048, 2048), "sparse 2/3 take the 2048x2048 mask"
        assert torch.equal(atten_mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1)), "optimized causal mask"
        off = 0 if sparse_mode == 2 else sk - sq
        masked |= torch.ones(sq, sk, dtype=torch.bool).triu(1 + off)
    elif sparse_mode == 0 and atten_mask is not None:
        assert atten_mask.dtype == torch.bool, "atten_mask is bool (True = not attended)"
        masked |= atten_mask.reshape(*([1] * (4 - atten_mask.dim())), *atten_mask.shape).expand(b, 1, sq, sk)
    else:
        assert sparse_mode == 0, f"emulator: sparse_mode {sparse_mode}"
    if actual_seq_kvlen is not None:
        for i, n_k in enumerate(actual_seq_kvlen[:b]):
            masked[i, :, :, n_k:] = True
    scores = scores.masked_fill(masked, float("-inf"))
    probs = torch.softmax(scores, -1)
    if inner_precise & 2:  # row-invalid correction: a row with no allowed key gives 0
        probs = probs.nan_to_num(0.0)
    out = (probs @ v).to(out_dtype)
    if input_layout.endswith("BSND") or (input_layout.startswith("BSND") and "_" not in input_layout):
        out = out.transpose(1, 2)
    return out, torch.zeros(1)


def npu_fused_infer_attention_score(query, key, value, *, atten_mask=None, pse_shift=None, actual_seq_lengths_kv=None,
                                    num_heads=1, scale=1.0, num_key_value_heads=0, input_layout="BSH", sparse_mode=0,
                                    inner_precise=0, **rest):
    assert not {"query_quant_mode", "dequant_scale_query", "softmax_scale", "num_query_heads"} & set(rest), \
        f"v2 arguments passed to the v1 op: {sorted(rest)}"
    CALLS.append(dict(op="v1", query=query, atten_mask=atten_mask, num_heads=num_heads, scale=scale,
                      num_key_value_heads=num_key_value_heads, input_layout=input_layout, sparse_mode=sparse_mode))
    return _attention(query, key, value, atten_mask, pse_shift, actual_seq_lengths_kv, None, None, None, num_heads,
                      num_key_value_heads, scale, input_layout, sparse_mode, (0, 0, 0), inner_precise)


def module(v2: bool = True) -> types.ModuleType:
    mod = types.ModuleType("torch_npu")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)  # libraries probe find_spec("torch_npu")
    mod.npu_fused_infer_attention_score = npu_fused_infer_attention_score
    if v2:
        mod.npu_fused_infer_attention_score_v2 = npu_fused_infer_attention_score_v2
    mod.__attnfx_emulator__ = True
    return mod
