"""Mask structures: what a dense attention mask really says, as small immutable classes.

Each structure can ``materialize()`` the dense boolean mask it stands for (True = attend), so "the plan
equals the mask" is one ``torch.equal`` — in the tests and in the runtime verification — and can list
its ``segments()``: rectangles of (query rows × contiguous key range) that an unmasked kernel computes
one by one, optionally causal (bottom-right aligned inside the rectangle), optionally with a sliding window
(each row then also sees only the ``window`` keys ending at its diagonal). Query rows covered by no
segment have no allowed key.

    NoMask          every key
    Causal          key j allowed for query i when j <= i (+ K - Q if bottom-right), optional window
    Padding         per batch row, keys [0, len) (right) or [K - len, K) (left), optionally causal (and windowed)
    BlockDiagonal   packed sequences: query block b sees key block b only (optionally causal)
    RowGroups       contiguous query row groups, each seeing one contiguous key range
    General         anything else (kept dense)

:func:`classify` reads a dense mask (bool, or float with only 0 and -inf / finfo.min entries) on its
device, finds the structure, and verifies it by materializing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class Segment:
    """Query rows [q0, q1) attend keys [k0, k1) — all of them, or causally: row r sees the keys up to its
    diagonal ``k1 - q1 + r`` (bottom-right aligned) and, with a ``window``, only the last ``window`` of them
    (keys j with ``diagonal - window < j <= diagonal``: HF's ``sliding_window``, FlashAttention's
    ``window_size=(window - 1, 0)``). Every row of a causal segment has its diagonal at or after ``k0``."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool = False
    batch: int | None = None  # one batch row, or None for all
    window: int | None = None  # with causal: keys per row, counting the diagonal

    def __post_init__(self):
        if self.window is not None and not (self.causal and self.window >= 1):
            raise ValueError("a segment's window needs causal and at least one key")

    def band(self) -> torch.Tensor:
        """The segment's (q1 - q0, k1 - k0) bool block: True where a row may attend a key."""
        lq, lk = self.q1 - self.q0, self.k1 - self.k0
        block = torch.ones(lq, lk, dtype=torch.bool)
        if self.causal:
            block = block.tril(diagonal=lk - lq)
        if self.window is not None:
            block = block.triu(diagonal=lk - lq - self.window + 1)
        return block

    def windowed(self) -> bool:
        """Whether the window cuts any row (the last row has the most keys before its diagonal)."""
        return self.window is not None and self.k1 - self.k0 > self.window

    def allowed(self, q_len: int, kv_len: int, device=None) -> torch.Tensor:
        m = torch.zeros(q_len, kv_len, dtype=torch.bool, device=device)
        m[self.q0:self.q1, self.k0:self.k1] = self.band().to(device)
        return m

    def split_rows(self, rows: int) -> list[Segment]:
        """The segment as blocks of ``rows`` query rows, each over the keys its rows may attend (a band, for a
        windowed segment): the same (row, key) pairs, since every block keeps the rows' diagonals and window."""
        if not self.causal:
            return [Segment(r, min(r + rows, self.q1), self.k0, self.k1, batch=self.batch)
                    for r in range(self.q0, self.q1, rows)]
        out = []
        for r0 in range(self.q0, self.q1, rows):
            r1 = min(r0 + rows, self.q1)
            diag0 = self.k1 - self.q1 + r0  # the first row's diagonal
            k0 = self.k0 if self.window is None else max(self.k0, diag0 - self.window + 1)
            out.append(Segment(r0, r1, k0, self.k1 - self.q1 + r1, causal=True, batch=self.batch,
                               window=self.window))
        return out


class MaskStructure:
    kind: ClassVar[str]
    batch: int = 1  # batch rows the structure distinguishes (1: the same for every row)

    def segments(self, q_len: int, kv_len: int) -> list[Segment]:
        raise NotImplementedError

    def materialize(self, q_len: int, kv_len: int, device=None) -> torch.Tensor:
        """The dense bool mask, shape (batch, 1, q_len, kv_len)."""
        out = torch.zeros(self.batch, 1, q_len, kv_len, dtype=torch.bool, device=device)
        for s in self.segments(q_len, kv_len):
            rows = range(self.batch) if s.batch is None else (s.batch,)
            block = s.allowed(q_len, kv_len, device)
            for b in rows:
                out[b, 0] |= block
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class NoMask(MaskStructure):
    kind: ClassVar[str] = "none"

    def segments(self, q_len, kv_len):
        return [Segment(0, q_len, 0, kv_len)]


@dataclass(frozen=True)
class Causal(MaskStructure):
    """j <= i (top-left) or j <= i + kv_len - q_len (bottom-right); with a window, also j > that - window."""

    kind: ClassVar[str] = "causal"
    align: str = "top_left"
    window: int | None = None

    def _offset(self, q_len, kv_len):
        return 0 if self.align == "top_left" else kv_len - q_len

    def segments(self, q_len, kv_len):
        return causal_segments(q_len, 0, kv_len, self._offset(q_len, kv_len), window=self.window)

    def describe(self):
        d = {"kind": self.kind, "align": self.align}
        if self.window is not None:
            d["window"] = self.window
        return d


@dataclass(frozen=True)
class Padding(MaskStructure):
    """Per batch row b, only ``lengths[b]`` keys are real: the first ones (right padding) or the last
    ones (left padding). With ``causal``, also j <= i (aligned as given, over the full length), and with a
    ``window``, also j > i - window (HF's sliding-window layers on a padded batch)."""

    kind: ClassVar[str] = "padding"
    lengths: tuple[int, ...] = ()
    side: str = "right"
    causal: str | None = None
    window: int | None = None

    def __post_init__(self):
        if self.window is not None and self.causal is None:
            raise ValueError("a padding window needs causal")

    @property
    def batch(self) -> int:  # type: ignore[override]
        return len(self.lengths)

    def segments(self, q_len, kv_len):
        segs = []
        for b, n in enumerate(self.lengths):
            k0, k1 = (0, n) if self.side == "right" else (kv_len - n, kv_len)
            if n == 0:
                continue
            if self.causal is None:
                segs.append(Segment(0, q_len, k0, k1, batch=b))
            else:
                segs += causal_segments(q_len, k0, k1, 0 if self.causal == "top_left" else kv_len - q_len, b,
                                        self.window)
        return segs

    def describe(self):
        d = {"kind": self.kind, "side": self.side, "lengths": list(self.lengths), "causal": self.causal}
        if self.window is not None:
            d["window"] = self.window
        return d


def causal_segments(q_len: int, k0: int, k1: int, off: int, batch: int | None = None,
                    window: int | None = None) -> list[Segment]:
    """Rows i seeing keys [k0, min(k1, i + off + 1)) — with a window, only those after i + off - window: none
    at first, then a causal run (windowed), then rows whose diagonal lies past the keys: all of them, or with a
    window each row its own shrinking range (one segment per row) until none is left."""
    first = max(0, k0 - off)
    causal_end = min(q_len, max(first, k1 - off))
    segs = []
    if causal_end > first:
        segs.append(Segment(first, causal_end, k0, causal_end + off, causal=True, batch=batch, window=window))
    start = max(first, causal_end)
    if window is None:
        if start < q_len and k1 > k0:
            segs.append(Segment(start, q_len, k0, k1, batch=batch))
        return segs
    for r in range(start, q_len):
        lo = max(k0, r + off - window + 1)
        if lo >= k1:
            break
        segs.append(Segment(r, r + 1, lo, k1, batch=batch))
    return segs


@dataclass(frozen=True)
class BlockDiagonal(MaskStructure):
    """Packed sequences: query block b (q_seqlens[b] rows) sees key block b only; causal bottom-right."""

    kind: ClassVar[str] = "block_diagonal"
    q_seqlens: tuple[int, ...] = ()
    kv_seqlens: tuple[int, ...] = ()
    causal: bool = False

    def segments(self, q_len, kv_len):
        segs, q0, k0 = [], 0, 0
        for lq, lk in zip(self.q_seqlens, self.kv_seqlens):
            if lq and lk:
                segs.append(Segment(q0, q0 + lq, k0, k0 + lk, causal=self.causal))
            q0, k0 = q0 + lq, k0 + lk
        return segs

    def describe(self):
        return {"kind": self.kind, "q_seqlens": list(self.q_seqlens), "kv_seqlens": list(self.kv_seqlens),
                "causal": self.causal}


@dataclass(frozen=True)
class RowGroups(MaskStructure):
    """Contiguous query row groups, each seeing one contiguous key range — all of it, or causally
    (bottom-right inside the group, e.g. a causal text prefix before a block of image rows)."""

    kind: ClassVar[str] = "row_groups"
    groups: tuple[Segment, ...] = ()

    def segments(self, q_len, kv_len):
        return list(self.groups)

    def describe(self):
        return {"kind": self.kind, "groups": [[g.q0, g.q1, g.k0, g.k1] + (["causal"] if g.causal else [])
                                              for g in self.groups]}


@dataclass(frozen=True, eq=False)
class General(MaskStructure):
    kind: ClassVar[str] = "general"
    dense: torch.Tensor | None = field(default=None, repr=False)

    def segments(self, q_len, kv_len):
        raise ValueError("a general mask has no segments")

    def materialize(self, q_len, kv_len, device=None):
        return self.dense.to(device)


# ---------------------------------------------------------------------------------------------------
# classification


@dataclass(frozen=True)
class Analysis:
    """A classified mask: its structure, which rows have no allowed key, and how the mask spells "masked"."""

    structure: MaskStructure
    spelling: str  # "bool" | "-inf" | "finfo.min"
    q_len: int
    kv_len: int
    empty_rows: int  # number of (batch row, query row) pairs with no allowed key
    dead_keys: int = 0  # key columns no query row of any batch row may attend

    def describe(self) -> dict[str, Any]:
        d = self.structure.describe()
        if self.empty_rows:
            d["rows_without_keys"] = self.empty_rows
        if self.dead_keys:
            d["keys_never_attended"] = self.dead_keys
        return d


MAX_GROUPS = 64


def allowed_of(mask: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """(bool "may attend" tensor, spelling) of an SDPA mask, or None if it is a bias (other values)."""
    if mask.dtype == torch.bool:
        return mask, "bool"
    if not mask.dtype.is_floating_point:
        return None
    zero = mask == 0
    neg_inf = mask == float("-inf")
    fmin = mask == torch.finfo(mask.dtype).min
    if not bool((zero | neg_inf | fmin).all()):
        return None
    has_inf, has_min = bool(neg_inf.any()), bool(fmin.any())
    if has_inf and has_min:
        return None
    return zero, ("finfo.min" if has_min else "-inf")


def classify(mask: torch.Tensor, batch: int, heads: int, q_len: int, kv_len: int) -> Analysis | None:
    """The structure of an SDPA attn_mask (broadcastable to (batch, heads, q_len, kv_len)), or None for a bias.

    Reads the mask once on its device and moves O(batch * q_len) integers to the host.
    """
    got = allowed_of(mask)
    if got is None:
        return None
    allowed, spelling = got
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    if allowed.shape[1] != 1:  # one mask per head: only if all heads agree
        if not bool((allowed == allowed[:, :1]).all()):
            return Analysis(General(allowed), spelling, q_len, kv_len, _empty(allowed),
                            int((~allowed.any(-2).any(0).any(0)).sum()))
        allowed = allowed[:, :1]
    allowed = allowed.expand(allowed.shape[0], 1, q_len, kv_len)
    m = allowed[:, 0]  # (Bm, Q, K)
    any_ = m.any(-1)
    lo = m.to(torch.uint8).argmax(-1)
    hi = kv_len - 1 - m.flip(-1).to(torch.uint8).argmax(-1)
    contiguous = bool(((m.sum(-1) == hi - lo + 1) | ~any_).all())
    empty = int((~any_).sum()) * (batch if m.shape[0] == 1 else 1)
    dead_keys = int((~m.any(0).any(0)).sum())
    if not contiguous:
        return Analysis(General(allowed), spelling, q_len, kv_len, empty, dead_keys)
    rows = torch.stack([lo, hi + 1, any_.to(lo.dtype)], -1).tolist()  # per batch row, per query row: [k0, k1, any]
    structure = _structure(rows, q_len, kv_len)
    if structure is not None and not torch.equal(structure.materialize(q_len, kv_len, m.device)
                                                 .expand_as(allowed), allowed):
        structure = None  # never trust a classification that does not reproduce the mask
    return Analysis(structure or General(allowed), spelling, q_len, kv_len, empty, dead_keys)


def _empty(allowed: torch.Tensor) -> int:
    return int((~allowed.any(-1)).sum())


def _intervals(rows: list[list[int]]) -> list[tuple[int, int]]:
    return [(k0, k1) if any_ else (0, 0) for k0, k1, any_ in rows]


def _structure(rows_per_batch: list[list[list[int]]], q_len: int, kv_len: int) -> MaskStructure | None:
    per_batch = [_intervals(r) for r in rows_per_batch]
    if all(iv == per_batch[0] for iv in per_batch):
        s = _single(per_batch[0], q_len, kv_len)
        if s is not None and not isinstance(s, RowGroups):
            return s
        p = _padding(per_batch, q_len, kv_len)  # row groups, unless padding says it in fewer segments (a window)
        if s is None or (p is not None and len(p.segments(q_len, kv_len)) < len(s.segments(q_len, kv_len))):
            return p
        return s
    return _padding(per_batch, q_len, kv_len)


def _single(iv: list[tuple[int, int]], q_len: int, kv_len: int) -> MaskStructure | None:
    if all(i == (0, kv_len) for i in iv):
        return NoMask()
    for align, off in (("top_left", 0), ("bottom_right", kv_len - q_len)):
        if all(i == _causal_iv(r, off, kv_len, None) for r, i in enumerate(iv)):
            return Causal(align)
        window = _window(iv, off, kv_len)
        if window is not None:
            return Causal(align, window)
    runs = _runs(iv)
    tiles = (len(runs) >= 2 and runs[0].q0 == 0 and runs[-1].q1 == q_len and runs[0].k0 == 0
             and runs[-1].k1 == kv_len and all(a.q1 == b.q0 and a.k1 == b.k0 for a, b in zip(runs, runs[1:])))
    if tiles and len({r.causal for r in runs}) == 1:
        return BlockDiagonal(tuple(r.q1 - r.q0 for r in runs), tuple(r.k1 - r.k0 for r in runs), runs[0].causal)
    if len(runs) <= MAX_GROUPS:
        return RowGroups(tuple(runs))
    return None


def _causal_iv(r: int, off: int, kv_len: int, window: int | None) -> tuple[int, int]:
    k1 = min(kv_len, r + off + 1)
    k0 = 0 if window is None else max(0, r + off - window + 1)
    return (k0, k1) if k1 > k0 else (0, 0)


def _window(iv, off, kv_len) -> int | None:
    w = max(k1 - k0 for k0, k1 in iv)  # the window, if any: the most keys a row sees
    if w <= 0 or w >= kv_len:
        return None
    return w if all(i == _causal_iv(r, off, kv_len, w) for r, i in enumerate(iv)) else None


def _runs(iv: list[tuple[int, int]]) -> list[Segment]:
    """Run-length encode rows into segments: equal intervals (full) or one more key per row (causal)."""
    runs: list[Segment] = []
    r = 0
    while r < len(iv):
        k0, k1 = iv[r]
        if k1 == k0:  # a row with no allowed key belongs to no segment
            r += 1
            continue
        n = 1
        while r + n < len(iv) and iv[r + n] == (k0, k1):
            n += 1
        causal = False
        if n == 1:
            while r + n < len(iv) and iv[r + n] == (k0, k1 + n):
                n += 1
            causal = n > 1
        runs.append(Segment(r, r + n, k0, k1 + n - 1 if causal else k1, causal=causal))
        r += n
    return runs


def _padding(per_batch: list[list[tuple[int, int]]], q_len: int, kv_len: int) -> MaskStructure | None:
    widest = max((k1 - k0 for iv in per_batch for k0, k1 in iv), default=0)  # a window's size, if any
    for side in ("right", "left"):
        for causal in (None, "top_left", "bottom_right"):
            for window in ((None,) if causal is None or widest == 0 else (None, widest)):
                lengths = []
                for iv in per_batch:
                    n = _padding_length(iv, side, causal, window, q_len, kv_len)
                    if n is None:
                        break
                    lengths.append(n)
                else:
                    return Padding(tuple(lengths), side, causal, window)
    return None


def _padding_length(iv, side, causal, window, q_len, kv_len) -> int | None:
    widest = max((k1 - k0 for k0, k1 in iv), default=0)
    candidates = {widest}
    if side == "right":
        candidates |= {k1 for _, k1 in iv}
    else:
        candidates |= {kv_len - k0 for k0, k1 in iv if k1 > k0}
    for n in sorted(candidates):
        p = Padding((n,), side, causal, window)
        expect = _intervals_of(p, q_len, kv_len)
        if expect == iv:
            return n
    return None


def _intervals_of(structure: MaskStructure, q_len: int, kv_len: int) -> list[tuple[int, int]]:
    iv = [(0, 0)] * q_len
    for s in structure.segments(q_len, kv_len):
        for r in range(s.q0, s.q1):
            k1 = s.k1 - (s.q1 - 1 - r) if s.causal else s.k1
            k0 = s.k0 if s.window is None else max(s.k0, k1 - s.window)
            iv[r] = (k0, k1) if k1 > k0 else (0, 0)
    return iv
