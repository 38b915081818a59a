"""Run a mask structure on a kernel: the segments of the structure, each an unmasked (or causal) attention
over a slice of the queries and a contiguous range of the keys, and the rows with no allowed key filled
with what the original computes there.

Kernels (names as in the capability table):
  ``sdpa.split``    one SDPA call per segment (views, no copies), outputs concatenated;
  ``varlen.<impl>`` all segments packed into one (or, mixing causal and full segments, two) varlen calls;
  ``reference``     the pure-PyTorch reference, dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnfx.backends import capabilities, reference, varlen
from attnfx.masks import Causal, General, MaskStructure, NoMask, Segment

FILLS = ("zero", "nan", "mean_v")
MAX_SPLIT = 16  # more segments than this: one varlen launch beats many small SDPA calls


def choose_kernel(structure: MaskStructure, q_len: int, kv_len: int, device: torch.device, dtype: torch.dtype,
                  head_dim: int, forced: str | None = None) -> tuple[str | None, str]:
    """(kernel, why) for running ``structure``; kernel None means: keep the dense masked SDPA."""
    if forced is not None:
        why = capabilities.supports(forced, device=device.type, dtype=dtype, head_dim=head_dim)
        return (None, why) if why else (forced, "forced by options")
    if isinstance(structure, General):
        return None, "no structure to exploit: the dense mask is kept"
    if isinstance(structure, Causal) and structure.window is not None:
        return None, "sliding-window masks are kept dense (no windowed kernel adapter yet)"
    segs = structure.segments(q_len, kv_len)
    ragged = any(s.causal and s.q1 - s.q0 != s.k1 - s.k0 for s in segs)  # bottom-right causal, not square
    impls = [f"varlen.{i}" for i in varlen.implementations(device, dtype) if i != "reference"]
    impls = [i for i in impls if not capabilities.supports(i, device=device.type, dtype=dtype, head_dim=head_dim)]
    if isinstance(structure, NoMask) or (len(segs) <= 2 and not ragged) or not impls:
        if len(segs) <= MAX_SPLIT:
            return "sdpa.split", f"{len(segs)} segment(s), one SDPA call each"
        return None, f"{len(segs)} segments and no varlen kernel on {device.type}/{dtype}: the dense mask is kept"
    return impls[0], f"{len(segs)} segments packed into varlen calls"


def run(structure: MaskStructure, kernel: str, q, k, v, *, scale=None, enable_gqa=False, fill="zero"):
    if kernel == "reference":
        allowed = structure.materialize(q.shape[-2], k.shape[-2], q.device)
        return reference.attention(q, k, v, allowed, scale=scale, fill=fill)
    segs = structure.segments(q.shape[-2], k.shape[-2])
    if kernel == "sdpa.split":
        outs = {id(s): _sdpa_segment(q, k, v, s, scale, enable_gqa) for s in segs}
    elif kernel.startswith("varlen."):
        outs = _varlen_segments(q, k, v, segs, scale, kernel[len("varlen."):])
    else:
        raise ValueError(f"unknown structured kernel {kernel!r}")
    return _assemble(q, k, v, segs, outs, fill)


def _rows(t: torch.Tensor, s: Segment, lo: int, hi: int) -> torch.Tensor:
    t = t if s.batch is None else t[s.batch:s.batch + 1]
    return t[..., lo:hi, :]


def _sdpa_segment(q, k, v, s: Segment, scale, enable_gqa):
    qs, ks, vs = _rows(q, s, s.q0, s.q1), _rows(k, s, s.k0, s.k1), _rows(v, s, s.k0, s.k1)
    lq, lk = s.q1 - s.q0, s.k1 - s.k0
    mask, is_causal = None, False
    if s.causal and lq == lk:
        is_causal = True
    elif s.causal:  # bottom-right with more keys than queries: SDPA's is_causal is top-left
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    kw = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=is_causal, scale=scale, **kw)


def _varlen_segments(q, k, v, segs: list[Segment], scale, impl: str) -> dict[int, torch.Tensor]:
    """Pack the segments as varlen sequences (one call per causal flag); outputs per segment, (…, H, rows, D)."""
    if q.dim() != 4:
        raise ValueError("varlen kernels take (batch, heads, seq, dim) inputs")
    outs = {}
    for causal in (False, True):
        group = [s for s in segs if s.causal == causal]
        if not group:
            continue
        q_parts, k_parts, v_parts, lq, lk, owners = [], [], [], [], [], []
        for s in group:
            for b in (range(q.shape[0]) if s.batch is None else (s.batch,)):
                q_parts.append(q[b, :, s.q0:s.q1].transpose(0, 1))
                k_parts.append(k[b, :, s.k0:s.k1].transpose(0, 1))
                v_parts.append(v[b, :, s.k0:s.k1].transpose(0, 1))
                lq.append(s.q1 - s.q0)
                lk.append(s.k1 - s.k0)
                owners.append((s, b))
        qp, kp, vp = (torch.cat(p, 0) if len(p) > 1 else p[0] for p in (q_parts, k_parts, v_parts))
        cu_q = torch.tensor([0] + lq, device=q.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0] + lk, device=q.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out = varlen.varlen_attention(qp, kp, vp, cu_q, cu_k, max(lq), max(lk), causal=causal, scale=scale,
                                      impl=impl)
        pieces = out.split(lq, 0)
        per_seg: dict[int, list] = {}
        for (s, b), piece in zip(owners, pieces):
            per_seg.setdefault(id(s), []).append(piece.transpose(0, 1).unsqueeze(0))
        for s in group:
            parts = per_seg[id(s)]
            outs[id(s)] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    return outs


def _fill(q, k, v, rows: int, fill: str, batch: int | None) -> torch.Tensor:
    qb = q if batch is None else q[batch:batch + 1]
    shape = (*qb.shape[:-2], rows, v.shape[-1])
    if fill == "zero":
        return qb.new_zeros(shape)
    if fill == "nan":
        return qb.new_full(shape, float("nan"))
    if fill == "mean_v":  # uniform weights over every key: what eager softmax gives on an all-finfo.min row
        vb = v if batch is None else v[batch:batch + 1]
        m = vb.to(torch.promote_types(vb.dtype, torch.float32)).mean(-2, keepdim=True).to(q.dtype)
        if m.shape[-3] != q.shape[-3]:
            m = m.repeat_interleave(q.shape[-3] // m.shape[-3], dim=-3)
        return m.expand(shape)
    raise ValueError(f"cannot fill rows with no allowed key with {fill!r}")


def _assemble(q, k, v, segs: list[Segment], outs: dict[int, torch.Tensor], fill: str) -> torch.Tensor:
    """Concatenate segment outputs in row order, filling the rows no segment covers."""
    q_len = q.shape[-2]
    if any(s.batch is not None for s in segs):
        rows = []
        for b in range(q.shape[0]):
            mine = [s for s in segs if s.batch in (None, b)]
            rows.append(_concat_rows(q, k, v, mine, outs, fill, q_len, b))
        return torch.cat(rows, 0)
    return _concat_rows(q, k, v, segs, outs, fill, q_len, None)


def _concat_rows(q, k, v, segs, outs, fill, q_len, batch):
    pieces, row = [], 0
    for s in sorted(segs, key=lambda s: s.q0):
        if s.q0 > row:
            pieces.append(_fill(q, k, v, s.q0 - row, fill, batch))
        out = outs[id(s)]
        if batch is not None and s.batch is None:
            out = out[batch:batch + 1]
        pieces.append(out)
        row = s.q1
    if row < q_len:
        pieces.append(_fill(q, k, v, q_len - row, fill, batch))
    return torch.cat(pieces, -2) if len(pieces) > 1 else pieces[0]
