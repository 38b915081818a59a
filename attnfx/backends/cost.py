"""What running an attention costs, from counts — launches, FLOPs, bytes, host syncs — at one device's rates.

Estimates to rank choices, not measurements: the dense masked SDPA against a mask structure's kernels, and
whether reading a mask on the host can pay at all. The rates are data (measured on an NVIDIA H200 with torch
2.11, see BENCHMARKS.md; the CPU's are rough): one table, like the capability table beside it.

* Attention with at most ``SMALL_QUERY`` query rows (decoding) reads K and V once whatever the mask says and
  does almost no arithmetic: a structure cannot make it faster, and reading a mask that changes on every
  call costs a host sync each time. On devices with rates, such sites keep the dense mask, unread.
* Devices without rates here (the CPU, where reading a mask is no sync) keep every exact structure.
* A structure's kernels (``sdpa.split``, varlen) compute only the allowed (query, key) pairs, in more
  launches, and concatenating segment outputs copies the output once more. ``pays`` compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnfx.masks import MaskStructure, Padding

SMALL_QUERY = 16  # query rows at or below which a run-time mask is not analysed (decoding, short prompts)
MARGIN = 0.9  # a structure is used where its estimate is below this share of the dense one


@dataclass(frozen=True)
class Rates:
    launch_s: float  # one kernel launch outside a CUDA graph, host and device
    flops: float  # attention FLOP/s of the fused kernels without a mask (or causal)
    masked_flops: float  # ... with a dense mask (read per tile, no skipped tiles)
    bytes_per_s: float  # memory bandwidth
    sync_s: float  # one host synchronisation (a mask read on the host)


RATES: dict[str, Rates] = {
    # H200 / torch 2.11 (BENCHMARKS.md): unmasked SDPA 550-670 TFLOP/s; the same attention with a dense bool
    # mask (cuDNN) ~290 TFLOP/s (HunyuanImage3 step >= 2: 342 GFLOP in 1.18 ms); device copy 4.3 TB/s
    "cuda": Rates(launch_s=5e-6, flops=600e12, masked_flops=290e12, bytes_per_s=4.0e12, sync_s=20e-6),
}


def small_query(device_type: str, q_len: Any) -> bool:
    """Whether a mask not known when compiling should be left unread: few query rows, on a device with rates."""
    return device_type in RATES and isinstance(q_len, int) and q_len <= SMALL_QUERY


@dataclass(frozen=True)
class Estimate:
    launches: int
    flops: float
    bytes: float
    seconds: float

    def describe(self) -> dict[str, Any]:
        return {"launches": self.launches, "gflop": round(self.flops / 1e9, 3), "mib": round(self.bytes / 2**20, 2),
                "us": round(self.seconds * 1e6, 1)}


def _estimate(launches: int, flops: float, rate: float, nbytes: float, rates: Rates) -> Estimate:
    return Estimate(launches, flops, nbytes, launches * rates.launch_s + flops / rate + nbytes / rates.bytes_per_s)


def _pairs(structure: MaskStructure, batch: int, q_len: int, kv_len: int) -> tuple[float, int]:
    """(allowed (query, key) pairs summed over batch rows, segments computed)."""
    segs = structure.segments(q_len, kv_len)
    pairs = 0.0
    for s in segs:
        rows, keys = s.q1 - s.q0, s.k1 - s.k0
        per_row = keys - (rows - 1) / 2 if s.causal and rows <= keys else keys / (2 if s.causal else 1)
        if s.window is not None:
            per_row = min(per_row, s.window)
        pairs += rows * max(per_row, 1) * (batch if s.batch is None else 1)
    n = sum(batch if s.batch is None else 1 for s in segs) if isinstance(structure, Padding) else len(segs)
    return pairs, n


def compare(structure: MaskStructure, kernel: str, device_type: str, batch: int, heads: int, q_len: int, kv_len: int,
            head_dim: int, itemsize: int, mask_batch: int = 1) -> tuple[Estimate, Estimate] | None:
    """(dense masked SDPA, the structure on ``kernel``) estimates, or None where this device has no rates."""
    rates = RATES.get(device_type)
    if rates is None:
        return None
    qo = 2 * batch * heads * q_len * head_dim * itemsize  # q read, output written
    kv = 2 * batch * heads * kv_len * head_dim * itemsize  # K and V read (GQA reads fewer: same on both sides)
    dense = _estimate(1, 4.0 * head_dim * heads * batch * q_len * kv_len, rates.masked_flops,
                      qo + kv + mask_batch * q_len * kv_len, rates)
    pairs, segments = _pairs(structure, batch, q_len, kv_len)
    launches = 1 if kernel.startswith("varlen") else segments + 1  # the split's outputs are put together
    copy = qo / 2 if not kernel.startswith("varlen") and segments > 1 else 0  # one more write of the output
    structured = _estimate(launches, 4.0 * head_dim * heads * pairs, rates.flops, qo + kv + copy, rates)
    return dense, structured


def pays(dense: Estimate, structured: Estimate) -> bool:
    return structured.seconds < MARGIN * dense.seconds
