"""The capability table: what each attention kernel accepts. One table, data, no branches.

Patterns never hard-code kernel facts; they ask this table (through the adapters beside it)
whether a kernel takes K/V with fewer heads natively, a dense mask, a causal alignment, packed
variable-length sequences, a causal sliding window, on which device/dtype/head_dim and from which torch
version.

``window`` is the torch version from which a kernel runs causal sliding windows (each query row sees the
``w`` keys ending at its diagonal: HF's ``sliding_window``), None if it never does. SDPA's own kernels take
no window argument; ``sdpa.split`` runs a window as blocks of query rows over their key band; FlashAttention
varlen kernels take ``window_size=(w - 1, 0)``; FlexAttention and the references take any mask. The adapters
also check what the installed version takes (``varlen.supports_window``).

``gqa`` says how a kernel treats K/V with fewer heads than Q:
  ``"native"``  reads each K/V head once for its group of query heads (no copy);
  ``"expands"`` accepts them but copies them to the query head count internally (no saving);
  ``"no"``      rejects them.

Sources: PyTorch's ``sdp_utils.cpp`` / ``sdp_utils_cpp.cpp`` and our measurements
(``benchmarks/probe_kernels.py``, numbers in BENCHMARKS.md). Where a fact was only read in the
source and not measured, ``verified`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


# What a kernel returns for a query row with no allowed key, per mask spelling:
#   "bool" (all False), "-inf" (additive, all -inf), "finfo.min" (additive, all finfo(dtype).min).
# Values: "zero", "nan", "mean_v" (uniform weights, as eager softmax gives), "unmasked" (attention over
# every key, as if the row had no mask), "other" (not reproducible), "unknown" (not measured).
NoKeyRows = dict


@dataclass(frozen=True)
class Kernel:
    name: str
    family: str  # adapter module in attnfx.backends
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int | None
    mask: bool  # takes an arbitrary dense (bool or additive) mask
    gqa: str  # "native" | "expands" | "no"
    causal: tuple[str, ...]  # causal alignments it implements without a mask
    varlen: bool  # packed sequences with cu_seqlens
    min_torch: tuple[int, int]
    min_arch: tuple[int, int] | None = None  # CUDA compute capability
    window: tuple[int, int] | None = None  # causal sliding windows from this torch version (None: never)
    no_key_rows: NoKeyRows = field(default_factory=lambda: {"bool": "unknown", "-inf": "unknown",
                                                            "finfo.min": "unknown"})
    verified: str = ""
    note: str = ""


_ZERO_ZERO_MEAN = {"bool": "zero", "-inf": "zero", "finfo.min": "mean_v"}

TABLE: tuple[Kernel, ...] = (
    Kernel("sdpa.flash", "sdpa", ("cuda",), (F16, BF16), 256, mask=False, gqa="native",
           causal=("top_left",), varlen=False, min_torch=(2, 5), min_arch=(8, 0),
           no_key_rows={"bool": "n/a", "-inf": "n/a", "finfo.min": "n/a"},
           verified="sdp_utils.cpp: backend_supports_grouped_query_attention = true"),
    Kernel("sdpa.efficient", "sdpa", ("cuda",), (F16, BF16, F32), None, mask=True, gqa="no",
           causal=("top_left", "bottom_right"), varlen=False, min_torch=(2, 5), min_arch=(5, 0),
           no_key_rows={"bool": "zero", "-inf": "zero", "finfo.min": "zero"},
           verified="measured on H200, torch 2.11: rejects K/V with fewer heads (selector falls back to math); "
                    "finfo.min rows give 0 (its exp2 scaling overflows finfo.min to -inf)",
           note="bf16 needs sm80+; GQA accepted in later torch versions per sdp_utils.cpp (not measured)"),
    Kernel("sdpa.cudnn", "sdpa", ("cuda",), (F16, BF16), 256, mask=True, gqa="native",
           causal=("top_left",), varlen=False, min_torch=(2, 5), min_arch=(9, 0),
           no_key_rows={"bool": "unmasked", "-inf": "zero", "finfo.min": "zero"},
           verified="measured on H200, torch 2.11: default for fp16/bf16 (d 64-256, with and without masks), "
                    "takes GQA with masks; a bool-mask row with no allowed key attends every key"),
    Kernel("sdpa.math", "sdpa", ("cuda", "cpu", "npu", "xpu", "mps"), (F16, BF16, F32, F64), None, mask=True,
           gqa="expands", causal=("top_left",), varlen=False, min_torch=(2, 5), no_key_rows=_ZERO_ZERO_MEAN,
           verified="measured on H200 torch 2.11 and CPU torch 2.13",
           note="materializes the (B, H, L, S) scores in float32; repeat_interleaves K/V for GQA"),
    Kernel("sdpa.cpu_flash", "sdpa", ("cpu",), (F16, BF16, F32, F64), None, mask=True, gqa="native",
           causal=("top_left",), varlen=False, min_torch=(2, 5), no_key_rows=_ZERO_ZERO_MEAN,
           verified="sdp_utils_cpp.cpp (supports_gqa); measured on CPU, torch 2.13", note="no dropout"),
)

# Structured kernels: run a mask structure's segments (attnfx/backends/execute.py). They never see the
# dense mask; rows with no allowed key are filled with what the original kernel gives there.
_ANY_FILL = {"bool": "any", "-inf": "any", "finfo.min": "any"}
TABLE += (
    Kernel("sdpa.split", "execute", ("cuda", "cpu", "npu", "xpu", "mps"), (F16, BF16, F32, F64), None,
           mask=False, gqa="native", causal=("top_left", "bottom_right"), varlen=True, min_torch=(2, 5),
           no_key_rows=_ANY_FILL, window=(2, 5),
           note="one SDPA call per segment (views of q/k/v, no copies); a bottom-right causal segment with more "
                "keys than queries takes a small bool mask; a sliding window runs as blocks of query rows, each "
                "over its key band with a small band mask (or is_causal where the window cuts nothing)"),
    Kernel("varlen.flash_attn", "varlen", ("cuda",), (F16, BF16), 256, mask=False, gqa="native",
           causal=("bottom_right",), varlen=True, min_torch=(2, 5), min_arch=(8, 0), no_key_rows=_ANY_FILL,
           window=(2, 5), verified="not measured here (flash-attn not installed on the test GPU); window_size "
                                   "(flash-attn >= 2.3) tested through the reference only"),
    Kernel("varlen.torch.varlen", "varlen", ("cuda",), (F16, BF16), 256, mask=False, gqa="native",
           causal=("bottom_right",), varlen=True, min_torch=(2, 10), min_arch=(8, 0), no_key_rows=_ANY_FILL,
           window=(2, 11), verified="measured on H200, torch 2.11: K/V with fewer heads accepted; window_size "
                                    "read in torch's source (2.11, 2.13), checked by benchmarks/gpu_correctness.py"),
    Kernel("varlen.aten.flash", "varlen", ("cuda",), (F16, BF16), 256, mask=False, gqa="native",
           causal=("bottom_right",), varlen=True, min_torch=(2, 5), min_arch=(8, 0), no_key_rows=_ANY_FILL,
           window=(2, 5), verified="measured on H200, torch 2.11: K/V with fewer heads accepted; window_size_left/"
                                   "right read in the op's schema (torch 2.13), checked by gpu_correctness.py"),
    Kernel("varlen.reference", "varlen", ("cuda", "cpu"), (F16, BF16, F32, F64), None, mask=False,
           gqa="expands", causal=("bottom_right",), varlen=True, min_torch=(2, 5), no_key_rows=_ANY_FILL,
           window=(2, 5), note="pure PyTorch, for tests: FlashAttention's varlen semantics, windows included"),
    Kernel("flex", "flex", ("cuda", "cpu"), (F16, BF16, F32), None, mask=True, gqa="native",
           causal=("top_left", "bottom_right"), varlen=False, min_torch=(2, 5),
           no_key_rows={"bool": "zero", "-inf": "zero", "finfo.min": "zero"}, window=(2, 5),
           verified="CPU (torch 2.13): rows with no allowed key give 0; H200 torch 2.11: exact where Inductor lowers "
                    "it, which it could not for some short sequences (the site then falls back to the dense mask)",
           note="block mask derived once per distinct mask (from the structure's formula for causal, windowed and "
                "padded masks, else from the dense mask); compiled per shape on CUDA"),
    Kernel("reference", "reference", ("cuda", "cpu"), (F16, BF16, F32, F64), None, mask=True,
           gqa="expands", causal=("top_left", "bottom_right"), varlen=False, min_torch=(2, 5),
           no_key_rows=_ANY_FILL, window=(2, 5), note="pure PyTorch, for tests"),
)

# Online FP8 attention (``fp8=True``): takes the site's Q/K/V (dtypes below) and quantizes them; no masks.
TABLE += (
    Kernel("cudnn.sdpa_fp8", "cudnn_fp8", ("cuda",), (F16, BF16, F32), 256, mask=False, gqa="native",
           causal=("top_left",), varlen=False, min_torch=(2, 5), min_arch=(9, 0),
           no_key_rows={"bool": "n/a", "-inf": "n/a", "finfo.min": "n/a"},
           verified="measured on H200 (cuDNN 9.19, frontend 1.32, benchmarks/probe_fp8.py): B=1, d=128, no mask, "
                    "per-tensor descales (1,1,1,1); per-head (1,H,1,1) descales did not build; the output is FP8 "
                    "on Hopper (bf16 refused). GQA and causal: not measured, the graph build decides at run time",
           note="cuDNN frontend sdpa_fp8; bounded, not exact: relative L2 measured per site (fp8_max_error)"),
)

BY_NAME = {k.name: k for k in TABLE}


def structured_kernels() -> list[str]:
    """The kernels that run a mask structure's segments (what ``kernel=`` may force): every family but SDPA's own
    and the FP8 one (no masks)."""
    return [k.name for k in TABLE if k.family not in ("sdpa", "cudnn_fp8")]


def kernel(name: str) -> Kernel:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown kernel {name!r}; known: {', '.join(BY_NAME)}") from None


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def supports(name: str, *, device: str, dtype: torch.dtype, head_dim: int | None = None,
             arch: tuple[int, int] | None = None, version: tuple[int, int] | None = None,
             window: bool = False) -> str | None:
    """None if kernel ``name`` runs on this device/dtype/head_dim/arch/torch (with a sliding window, if asked),
    else why not."""
    k = kernel(name)
    version = version or torch_version()
    if device not in k.devices:
        return f"{k.name} does not run on {device}"
    if dtype not in k.dtypes:
        return f"{k.name} does not take {dtype}"
    if k.max_head_dim is not None and head_dim is not None and head_dim > k.max_head_dim:
        return f"{k.name} takes head_dim <= {k.max_head_dim}, not {head_dim}"
    if version < k.min_torch:
        return f"{k.name} needs torch >= {k.min_torch[0]}.{k.min_torch[1]}"
    if k.min_arch is not None and arch is not None and arch < k.min_arch:
        return f"{k.name} needs compute capability >= {k.min_arch}"
    if window and k.window is None:
        return f"{k.name} takes no sliding window"
    if window and version < k.window:
        return f"{k.name} takes a sliding window from torch {k.window[0]}.{k.window[1]}"
    return None
