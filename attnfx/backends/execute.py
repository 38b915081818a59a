"""Run a mask structure on a kernel: the segments of the structure, each an unmasked (or causal) attention
over a slice of the queries and a contiguous range of the keys, and the rows with no allowed key filled
with what the original computes there.

Kernels (names as in the capability table):
  ``sdpa.split``    one SDPA call per segment (views, no copies), outputs concatenated; a sliding-window
                    segment as blocks of query rows, each over the band of keys its rows may attend, with a
                    small band mask (``band_blocks``);
  ``varlen.<impl>`` the segments packed into one (or, mixing causal and full segments, two) varlen calls,
                    windows passed as FlashAttention's ``window_size``; zero-copy where the layout allows (one
                    packed batch row of block-diagonal sequences; right padding through ``seqused_k``; a window
                    over every row and key of each batch row, the batch rows as equal-length sequences);
  ``reference``     the pure-PyTorch reference, dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnfx.backends import capabilities, reference, varlen
from attnfx.masks import BlockDiagonal, General, MaskStructure, Padding, Segment

FILLS = ("zero", "nan", "mean_v", "unmasked")
MAX_SPLIT = 16  # more segments than this: one varlen launch beats many small SDPA calls
BAND_WORK = 0.75  # band blocks are worth their launches when they compute at most this share of the dense scores
MAX_WINDOW_SEGMENTS = 256  # a windowed structure in more pieces than this (right padding, wide window) stays dense


def window_of(structure: MaskStructure) -> int | None:
    """The structure's sliding window (keys per query row, counting the diagonal), if any."""
    return getattr(structure, "window", None)


def band_blocks(segs: list[Segment]) -> tuple[list[Segment], int]:
    """The segments with each windowed one cut into blocks of query rows over their key bands, and the rows per
    block: the window (a sequence's first block is then exactly causal: is_causal, no mask), doubled until the
    calls fit in ``MAX_SPLIT``. Each block computes rows × (rows + window - 1) scores at most."""
    windowed = [s for s in segs if s.windowed()]
    if not windowed:
        return segs, 0
    rows, longest = max(s.window for s in windowed), max(s.q1 - s.q0 for s in windowed)
    while True:
        blocks = [b for s in segs for b in (s.split_rows(rows) if s.windowed() else [s])]
        if len(blocks) <= MAX_SPLIT or rows >= longest:
            return blocks, rows
        rows *= 2


def _scores(segs: list[Segment], batch: int, *, computed: bool) -> int:
    """(query, key) pairs over every batch row: those the SDPA calls compute (whole rectangles; half a square
    under is_causal), or those allowed."""
    total = 0
    for s in segs:
        lq, lk = s.q1 - s.q0, s.k1 - s.k0
        if computed and s.causal and not s.windowed() and lq == lk:
            n = lq * (lq + 1) // 2
        elif computed or not s.causal:
            n = lq * lk
        else:
            n = sum(min(lk - lq + r + 1, s.window or lk) for r in range(lq))
        total += n * (batch if s.batch is None else 1)
    return total


def _windowed_kernel(structure: MaskStructure, batch: int, q_len: int, kv_len: int, device: torch.device,
                     dtype: torch.dtype, head_dim: int) -> tuple[str | None, str]:
    """(kernel, why) for a sliding-window structure, by counting the scores each way computes."""
    w = window_of(structure)
    segs = structure.segments(q_len, kv_len)
    if len(segs) > MAX_WINDOW_SEGMENTS:
        return None, (f"sliding window of {w} keys: {len(segs)} segments (rows past a sequence's end each see their "
                      "own shrinking key range): the dense mask is kept")
    dense = batch * q_len * kv_len
    band = _scores(segs, batch, computed=False)
    impls = [f"varlen.{i}" for i in varlen.implementations(device, dtype) if i != "reference"
             and varlen.supports_window(i)
             and not capabilities.supports(f"varlen.{i}", device=device.type, dtype=dtype, head_dim=head_dim,
                                           window=True)]
    if impls:
        return impls[0], (f"sliding window of {w} keys: varlen with window_size=({w - 1}, 0) computes the band "
                          f"alone ({100 * band / dense:.0f}% of the dense scores)")
    blocks, rows = band_blocks(segs)
    computed = _scores(blocks, batch, computed=True)
    if len(blocks) <= MAX_SPLIT and computed <= BAND_WORK * dense:
        return "sdpa.split", (f"sliding window of {w} keys: {len(blocks)} SDPA call(s) over blocks of {rows} "
                              f"query rows, each on its key band with a small band mask: "
                              f"{100 * computed / dense:.0f}% of the dense scores (no windowed varlen kernel on "
                              f"{device.type}/{dtype})")
    return None, (f"sliding window of {w} keys: band blocks would take {len(blocks)} SDPA calls for "
                  f"{100 * computed / dense:.0f}% of the dense scores, and no windowed varlen kernel runs on "
                  f"{device.type}/{dtype}: the dense mask is kept")


def choose_kernel(structure: MaskStructure, batch: int, q_len: int, kv_len: int, device: torch.device,
                  dtype: torch.dtype, head_dim: int, forced: str | None = None) -> tuple[str | None, str]:
    """(kernel, why) for running ``structure``; kernel None means: keep the dense masked SDPA.

    One SDPA call per segment reads q/k/v in place; varlen is chosen where it reads them in place too
    (one packed batch row of block-diagonal sequences) or where segments are too many for separate calls.
    """
    window = window_of(structure) is not None
    if forced is not None:
        why = capabilities.supports(forced, device=device.type, dtype=dtype, head_dim=head_dim, window=window)
        if not why and window and forced.startswith("varlen.") and not varlen.supports_window(forced[7:]):
            why = f"{forced} takes no sliding window in this install"
        return (None, why) if why else (forced, "forced by options")
    if isinstance(structure, General):
        return None, "no structure to exploit: the dense mask is kept"
    if window:
        return _windowed_kernel(structure, batch, q_len, kv_len, device, dtype, head_dim)
    segs = structure.segments(q_len, kv_len)
    n = sum(batch if s.batch is None else 1 for s in segs) if isinstance(structure, Padding) else len(segs)
    ragged = any(s.causal and s.q1 - s.q0 != s.k1 - s.k0 for s in segs)  # bottom-right causal, not square
    impls = [f"varlen.{i}" for i in varlen.implementations(device, dtype) if i != "reference"]
    impls = [i for i in impls if not capabilities.supports(i, device=device.type, dtype=dtype, head_dim=head_dim)]
    if impls and isinstance(structure, BlockDiagonal) and batch == 1 and len(segs) > 2:
        return impls[0], f"{len(segs)} packed sequences, one varlen call reading them in place"
    if impls and (ragged or n > MAX_SPLIT):
        return impls[0], f"{n} segments packed into varlen calls"
    if n <= MAX_SPLIT:
        return "sdpa.split", f"{n} segment(s), one SDPA call each"
    return None, f"{n} segments and no varlen kernel on {device.type}/{dtype}: the dense mask is kept"


def candidates(structure: MaskStructure, batch: int, q_len: int, kv_len: int, device: torch.device,
               dtype: torch.dtype, head_dim: int, fill: str | None) -> list[str | None]:
    """Every kernel that computes this structure exactly here (None: the dense masked SDPA), for autotuning."""
    out: list[str | None] = [None]
    window = window_of(structure) is not None
    ok = lambda k: capabilities.supports(k, device=device.type, dtype=dtype, head_dim=head_dim,  # noqa: E731
                                         window=window) is None
    if not isinstance(structure, General):
        segs = structure.segments(q_len, kv_len)
        if len(band_blocks(segs)[0]) <= MAX_SPLIT:
            out.append("sdpa.split")
        out += [f"varlen.{i}" for i in varlen.implementations(device, dtype)
                if i != "reference" and ok(f"varlen.{i}") and fill != "unmasked"
                and (not window or varlen.supports_window(i))]
    if fill in (None, "zero") and ok("flex") and hasattr(torch.nn.attention, "flex_attention"):
        out.append("flex")
    return out


@dataclass
class _Call:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None
    enable_gqa: bool
    fill: str

    def rows(self, t: torch.Tensor, s: Segment, lo: int, hi: int) -> torch.Tensor:
        t = t if s.batch is None else t[s.batch:s.batch + 1]
        return t[..., lo:hi, :]

    def sdpa(self, s: Segment) -> torch.Tensor:
        q, k, v = self.rows(self.q, s, s.q0, s.q1), self.rows(self.k, s, s.k0, s.k1), self.rows(self.v, s, s.k0, s.k1)
        lq, lk = s.q1 - s.q0, s.k1 - s.k0
        mask, is_causal = None, False
        if s.windowed():  # a block of a sliding window: its band
            mask = s.band().to(q.device)
        elif s.causal and lq == lk:
            is_causal = True
        elif s.causal:  # bottom-right with more keys than queries: SDPA's is_causal is top-left
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        kw = {"enable_gqa": True} if self.enable_gqa else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, **kw)

    def gap(self, r0: int, r1: int, batch: int | None) -> torch.Tensor:
        """Rows [r0, r1) have no allowed key: what the original kernel gives there."""
        q = self.q if batch is None else self.q[batch:batch + 1]
        v = self.v if batch is None else self.v[batch:batch + 1]
        shape = (*q.shape[:-2], r1 - r0, v.shape[-1])
        if self.fill == "zero":
            return q.new_zeros(shape)
        if self.fill == "nan":
            return q.new_full(shape, float("nan"))
        if self.fill == "mean_v":  # uniform weights over every key: eager softmax on an all-finfo.min row
            m = v.to(torch.promote_types(v.dtype, torch.float32)).mean(-2, keepdim=True).to(q.dtype)
            if m.shape[-3] != q.shape[-3]:
                m = m.repeat_interleave(q.shape[-3] // m.shape[-3], dim=-3)
            return m.expand(shape)
        if self.fill == "unmasked":  # cuDNN with a bool mask: such a row attends every key
            return self.sdpa(Segment(r0, r1, 0, self.k.shape[-2], batch=batch))
        raise ValueError(f"cannot fill rows with no allowed key with {self.fill!r}")


def run(structure: MaskStructure, kernel: str, q, k, v, *, scale=None, enable_gqa=False, fill="zero"):
    if kernel == "reference":
        if fill == "unmasked":
            raise ValueError("the reference kernel does not reproduce 'unmasked' rows")
        allowed = structure.materialize(q.shape[-2], k.shape[-2], q.device)
        return reference.attention(q, k, v, allowed, scale=scale, fill=fill)
    call = _Call(q, k, v, scale, enable_gqa, fill)
    if kernel.startswith("varlen."):
        impl = kernel[len("varlen."):]
        fast = _varlen_zero_copy(structure, call, impl)
        if fast is not None:
            return fast
    segs = structure.segments(q.shape[-2], k.shape[-2])
    if kernel == "sdpa.split":
        segs = band_blocks(segs)[0]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        dominant = None if needs_grad else _dominant(segs, q.shape[-2])  # SDPA's backward saves its output
        if dominant is not None:
            return _overwrite(call, segs, dominant)
        outs = {id(s): call.sdpa(s) for s in segs}
    elif kernel.startswith("varlen."):
        outs = _varlen_segments(call, segs, kernel[len("varlen."):])
    else:
        raise ValueError(f"unknown structured kernel {kernel!r}")
    return _assemble(call, segs, outs)


def _dominant(segs: list[Segment], q_len: int) -> Segment | None:
    """A full (non-causal) segment holding nearly all rows, worth computing over every row."""
    if any(s.batch is not None for s in segs):
        return None
    big = max(segs, key=lambda s: s.q1 - s.q0, default=None)
    if big is None or big.causal or (len(segs) == 1 and big.q1 - big.q0 == q_len):
        return None
    return big if (big.q1 - big.q0) >= 0.9 * q_len else None


def _overwrite(c: _Call, segs: list[Segment], big: Segment) -> torch.Tensor:
    """The dominant segment's call over *all* rows gives the output tensor; the few other rows (computed
    with its keys, which is wrong for them) are then overwritten in place — no concatenation copy."""
    q_len = c.q.shape[-2]
    out = c.sdpa(Segment(0, q_len, big.k0, big.k1))
    for r0, r1, s in _row_pieces(segs, q_len):
        if s is None:
            out[..., r0:r1, :] = c.gap(r0, r1, None)
        elif s is not big:
            out[..., r0:r1, :] = c.sdpa(s)
    return out


def _row_pieces(segs: list[Segment], q_len: int):
    """The query rows in order, as (r0, r1, the segment computing them — None for rows no segment covers)."""
    row = 0
    for s in sorted(segs, key=lambda s: s.q0):
        if s.q0 > row:
            yield row, s.q0, None
        yield s.q0, s.q1, s
        row = s.q1
    if row < q_len:
        yield row, q_len, None


def _varlen_zero_copy(structure: MaskStructure, c: _Call, impl: str) -> torch.Tensor | None:
    """Layouts varlen kernels read in place: no packing copies, the output a view."""
    q, k, v = c.q, c.k, c.v
    if q.dim() != 4:
        return None
    b, _, lq, _ = q.shape
    lk = k.shape[-2]
    if isinstance(structure, BlockDiagonal) and b == 1 and sum(structure.q_seqlens) == lq \
            and sum(structure.kv_seqlens) == lk and all(structure.q_seqlens) and all(structure.kv_seqlens):
        cu_q = _cumsum(structure.q_seqlens, q.device)
        cu_k = _cumsum(structure.kv_seqlens, q.device)
        out = varlen.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_q, cu_k,
                                      max(structure.q_seqlens), max(structure.kv_seqlens), causal=structure.causal,
                                      scale=c.scale, impl=impl)
        return out.transpose(0, 1)[None]
    segs = structure.segments(lq, lk) if window_of(structure) is not None else []
    if len(segs) == 1 and segs[0].batch is None and (segs[0].q0, segs[0].q1, segs[0].k0, segs[0].k1) == (0, lq, 0, lk):
        # a window over every row and key (HF's sliding layers without padding): batch row i is sequence i
        pack = lambda t: t.transpose(1, 2).reshape(b * t.shape[2], t.shape[1], t.shape[3])  # noqa: E731
        cu_q = torch.arange(0, (b + 1) * lq, lq, device=q.device, dtype=torch.int32)
        cu_k = torch.arange(0, (b + 1) * lk, lk, device=q.device, dtype=torch.int32)
        out = varlen.varlen_attention(pack(q), pack(k), pack(v), cu_q, cu_k, lq, lk, causal=True, scale=c.scale,
                                      impl=impl, window=segs[0].window)
        return out.view(b, lq, q.shape[1], v.shape[-1]).transpose(1, 2)
    if not varlen.supports_seqused_k(impl) and impl != "reference" and varlen.supports_seqused_k("aten.flash"):
        impl = "aten.flash"  # the same FlashAttention kernels, reached through the op that takes seqused_k
    if (isinstance(structure, Padding) and structure.side == "right" and all(structure.lengths)
            and structure.causal is None and varlen.supports_seqused_k(impl)):
        # padded layout: sequence i is rows [i*L, (i+1)*L); seqused_k limits its keys to the real ones.
        # Not for causal masks: FlashAttention aligns causal to the *used* key length (measured on H200).
        pack = lambda t: t.transpose(1, 2).reshape(b * t.shape[2], t.shape[1], t.shape[3])  # noqa: E731
        cu_q = torch.arange(0, (b + 1) * lq, lq, device=q.device, dtype=torch.int32)
        cu_k = torch.arange(0, (b + 1) * lk, lk, device=q.device, dtype=torch.int32)
        used = torch.tensor(structure.lengths, device=q.device, dtype=torch.int32)
        out = varlen.varlen_attention(pack(q), pack(k), pack(v), cu_q, cu_k, lq, lk,
                                      causal=structure.causal is not None, scale=c.scale, impl=impl, seqused_k=used)
        return out.view(b, lq, q.shape[1], v.shape[-1]).transpose(1, 2)
    return None


def _cumsum(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *lengths], device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _varlen_segments(c: _Call, segs: list[Segment], impl: str) -> dict[int, torch.Tensor]:
    """Pack the segments as varlen sequences (one call per causal flag and window); outputs per segment, (…, H,
    rows, D)."""
    q, k, v = c.q, c.k, c.v
    if q.dim() != 4:
        raise ValueError("varlen kernels take (batch, heads, seq, dim) inputs")
    outs = {}
    for causal, window in sorted({(s.causal, s.window) for s in segs}, key=lambda cw: (cw[0], cw[1] or 0)):
        group = [s for s in segs if (s.causal, s.window) == (causal, window)]
        q_parts, k_parts, v_parts, lq, lk, owners = [], [], [], [], [], []
        for s in group:
            for b in (range(q.shape[0]) if s.batch is None else (s.batch,)):
                q_parts.append(q[b, :, s.q0:s.q1].transpose(0, 1))
                k_parts.append(k[b, :, s.k0:s.k1].transpose(0, 1))
                v_parts.append(v[b, :, s.k0:s.k1].transpose(0, 1))
                lq.append(s.q1 - s.q0)
                lk.append(s.k1 - s.k0)
                owners.append(s)
        qp, kp, vp = (torch.cat(p, 0) if len(p) > 1 else p[0] for p in (q_parts, k_parts, v_parts))
        out = varlen.varlen_attention(qp, kp, vp, _cumsum(lq, q.device), _cumsum(lk, q.device), max(lq), max(lk),
                                      causal=causal, scale=c.scale, impl=impl, window=window)
        per_seg: dict[int, list] = {}
        for s, piece in zip(owners, out.split(lq, 0)):
            per_seg.setdefault(id(s), []).append(piece.transpose(0, 1).unsqueeze(0))
        for s in group:
            parts = per_seg[id(s)]
            outs[id(s)] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    return outs


def _assemble(c: _Call, segs: list[Segment], outs: dict[int, torch.Tensor]) -> torch.Tensor:
    """Concatenate segment outputs in row order, filling the rows no segment covers."""
    if any(s.batch is not None for s in segs):
        return torch.cat([_concat_rows(c, [s for s in segs if s.batch in (None, b)], outs, b)
                          for b in range(c.q.shape[0])], 0)
    return _concat_rows(c, segs, outs, None)


def _concat_rows(c: _Call, segs: list[Segment], outs: dict[int, torch.Tensor], batch: int | None) -> torch.Tensor:
    pieces = []
    for r0, r1, s in _row_pieces(segs, c.q.shape[-2]):
        if s is None:
            pieces.append(c.gap(r0, r1, batch))
        else:  # a segment shared by every batch row gives this batch row its slice
            pieces.append(outs[id(s)][batch:batch + 1] if batch is not None and s.batch is None else outs[id(s)])
    return torch.cat(pieces, -2) if len(pieces) > 1 else pieces[0]
