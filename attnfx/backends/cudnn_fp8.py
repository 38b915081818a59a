"""Adapter for online FP8 attention on CUDA: the cuDNN frontend's ``sdpa_fp8`` (package nvidia-cudnn-frontend,
imported as ``cudnn``), plus the quantization it needs as plain torch functions the rewritten graph calls, so that
Inductor fuses them with what produces Q, K and V.

Contract (cuDNN frontend ``pygraph.sdpa_fp8``, as measured on an H200 with cuDNN 9.19 and frontend 1.32 by
``benchmarks/probe_fp8.py``):
  * Q, K, V in ``float8_e4m3fn``, (B, H, S, D) with any strides whose last one is 1; K/V may have fewer heads
    (GQA: the graph is built with their head count; if the build refuses, the site runs natively and says why);
  * one float32 descale per tensor, (1, 1, 1, 1) (per-head (1, H, 1, 1) descales did not build on Hopper):
    the kernel computes S = (Q·dq)(K·dk)ᵀ · attn_scale, P = softmax(S) with P rounded to FP8 as
    round(P · scale_s) · descale_s, O = P (V·dv), and writes round(O · scale_o) — in FP8: on Hopper the
    output must be FP8 (a bf16/fp16 output is accepted on Blackwell only);
  * masks: none, or causal top-left (``use_causal_mask``); nothing else here;
  * executed on the current torch stream, no host synchronization; a graph is built once per shape, layout and
    device (a second of host time) and cached, a refused build too.
Scales (chosen here, exact where they can be): Q and K are first rotated by the random-sign Hadamard matrix
with ±1 entries (``attnfx.backends.hadamard``, exact in every float dtype): (Q·R)(K·R)ᵀ = D · Q·Kᵀ, so
``attn_scale`` is the site's scale divided by D. Each of Q·R, K·R and the centred V is quantized with one scale
amax/448 (448 is E4M3's largest finite value). V is centred — its mean over the tokens, per (batch, head,
channel), subtracted before quantizing and added to O after — which is exact because every softmax row sums
to 1, and keeps the FP8 output's rounding to the varying part of O. P (≤ 1) is scaled by 256 (a power of two)
before its rounding. O ≤ max|V − mean| elementwise, so scale_o = 448 / amax(V − mean) cannot overflow.
Nothing here imports ``cudnn`` until FP8 attention is requested.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
TINY = torch.finfo(torch.float32).tiny  # a scale for an all-zero tensor (no division by zero)
P_SCALE = 256.0  # P (<= 1) times this before its FP8 rounding (power of two: exact), as probe_fp8 measured
PAD_TO = 128  # if a length the kernel refuses is not a multiple of this, the graph is rebuilt padded to it
KERNEL = "cudnn.sdpa_fp8"


class CudnnUnavailable(RuntimeError):
    """The cuDNN frontend (or its FP8 attention) cannot be used here."""


class KernelRefused(RuntimeError):
    """The frontend refused to build the FP8 attention graph for this shape/layout (the message says why)."""


# ---------------------------------------------------------------------------------------------------------------
# quantization: plain torch functions, called from the rewritten graph (Inductor fuses them) and by the tests


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x -> (x8, descale, scale): x8 = x·scale in float8_e4m3fn, descale = amax(|x|)/448 (float32, 0-d), scale
    = 1/descale. x ≈ x8·descale. The clamp only catches the last ulp of float32 rounding."""
    xf = x.float()
    descale = torch.clamp_min(xf.abs().amax() / FP8_MAX, TINY)
    scale = torch.reciprocal(descale)
    return torch.clamp(xf * scale, -FP8_MAX, FP8_MAX).to(FP8), descale, scale


def centre(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v -> (v - mean, mean): the mean over the tokens per (batch, head, channel), float32 (B, H, 1, D)."""
    mean = v.float().mean(dim=-2, keepdim=True)
    return v.float() - mean, mean


def dequantize(o8: torch.Tensor, descale: torch.Tensor, mean: torch.Tensor, n_rep: int, dtype: torch.dtype
               ) -> torch.Tensor:
    """The kernel's FP8 output back to the model's dtype: o8·descale_v + V's mean (each query head gets the mean of
    its K/V head: with GQA, head h reads K/V head h // n_rep)."""
    if n_rep != 1:
        mean = torch.repeat_interleave(mean, n_rep, dim=1)
    return (o8.float() * descale + mean).to(dtype)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """‖actual − expected‖ / ‖expected‖ in float32 (a 0-d tensor; reading it is a host sync)."""
    e = expected.float()
    return torch.linalg.vector_norm(actual.float() - e) / torch.linalg.vector_norm(e).clamp_min(TINY)


# ---------------------------------------------------------------------------------------------------------------
# the frontend


def _expose_torch_cudnn() -> None:
    """Point the frontend at the libcudnn torch already loaded: it looks in LD_LIBRARY_PATH before its own wheel
    dependency (which may be absent or another build). As probe_fp8 did on the H200."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "libcudnn.so" in ln and "/" in ln})
    except OSError:
        return
    for p in paths:
        if os.path.basename(p).startswith("libcudnn.so"):
            d = os.path.dirname(p)
            if d not in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
                os.environ["LD_LIBRARY_PATH"] = d + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")
            return


def load():
    """The ``cudnn`` module (nvidia-cudnn-frontend), or CudnnUnavailable saying why."""
    if "cudnn" not in sys.modules:
        if torch.cuda.is_available():
            torch.backends.cudnn.version()  # loads torch's libcudnn, which the frontend then finds
            _expose_torch_cudnn()
    try:
        mod = importlib.import_module("cudnn")
    except BaseException as e:  # noqa: BLE001 — a native import fails in many ways (OSError, SystemExit...)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise CudnnUnavailable(f"the cuDNN frontend (nvidia-cudnn-frontend) is not importable "
                               f"({type(e).__name__}: {e})") from None
    if not hasattr(getattr(mod, "pygraph", None), "sdpa_fp8"):
        raise CudnnUnavailable(f"this cuDNN frontend ({getattr(mod, '__version__', '?')}) has no pygraph.sdpa_fp8")
    return mod


def versions(mod) -> dict[str, Any]:
    try:
        backend = mod.backend_version()
    except Exception:  # noqa: BLE001 — only for the report
        backend = None
    return {"frontend": getattr(mod, "__version__", "?"), "cudnn": backend}


@dataclass
class Graph:
    """One built FP8 attention graph: its tensors, workspace size and padding (0: none)."""

    graph: Any
    tensors: dict[str, Any]
    workspace: int
    length: int  # the queries' (and keys') length
    pad: int  # rows of padding the kernel runs on (0: none)
    key: tuple = ()
    calls: int = 0


class _Handles(threading.local):
    def __init__(self):
        self.handles: dict = {}  # (module, device) -> [handle, the stream last set on it]


_GRAPHS: dict[tuple, Graph | KernelRefused] = {}
_GRAPHS_LOCK = threading.Lock()
_HANDLES = _Handles()
_CONSTANTS: dict[tuple, dict[str, torch.Tensor]] = {}


def clear() -> None:
    """Forget every built graph (tests, or a frontend swapped in sys.modules)."""
    with _GRAPHS_LOCK:
        _GRAPHS.clear()
    _HANDLES.handles.clear()
    _CONSTANTS.clear()
    BINDING[0] = "tensor"


def _handle(mod, device: torch.device):
    """This thread's cuDNN handle for ``device``, set to torch's current stream (set only when it changed)."""
    key = (id(mod), device.type, device.index)
    entry = _HANDLES.handles.get(key)
    if entry is None:
        if device.type == "cuda":
            with torch.cuda.device(device):
                entry = [mod.create_handle(), None]
        else:
            entry = [mod.create_handle(), None]
        _HANDLES.handles[key] = entry
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        if entry[1] != stream:
            mod.set_stream(entry[0], stream)
            entry[1] = stream
    return entry[0]


def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """P's scale and descale (read-only inputs of every call) on ``device``."""
    key = (device.type, device.index)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = {"scale_s": torch.full((1, 1, 1, 1), P_SCALE, device=device),
                           "descale_s": torch.full((1, 1, 1, 1), 1.0 / P_SCALE, device=device)}
    return _CONSTANTS[key]


def _build(mod, device, q_shape, k_shape, v_shape, strides, causal: bool, attn_scale: float, pad: int) -> Graph:
    dt = mod.data_type
    b, hq, sq, d = q_shape
    dv = v_shape[-1]
    g = mod.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                    handle=_handle(mod, device))
    t: dict[str, Any] = {}
    if pad:  # padded copies are made contiguous
        shapes = {n: (s[0], s[1], s[2] + pad, s[3]) for n, s in zip("qkv", (q_shape, k_shape, v_shape))}
        strides = {n: _contiguous(s) for n, s in shapes.items()}
    else:
        shapes = dict(zip("qkv", (q_shape, k_shape, v_shape)))
        strides = dict(zip("qkv", strides))
    for n in "qkv":
        t[n] = g.tensor(name=n, dim=list(shapes[n]), stride=list(strides[n]), data_type=dt.FP8_E4M3)
    for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[n] = g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT)
    kw = dict(q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
              descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
              generate_stats=False, attn_scale=float(attn_scale), use_causal_mask=bool(causal))
    if pad:
        for n in ("seq_q", "seq_kv"):
            t[n] = g.tensor(name=n, dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.INT32)
        kw.update(use_padding_mask=True, seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"])
    outs = g.sdpa_fp8(**kw)
    t["o"], t["amax_s"], t["amax_o"] = outs[0], outs[2], outs[3]
    o_dims = [b, hq, sq + pad, dv]
    t["o"].set_output(True).set_dim(o_dims).set_stride(list(_contiguous(o_dims))).set_data_type(dt.FP8_E4M3)
    for n in ("amax_s", "amax_o"):
        t[n].set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([mod.heur_mode.A, mod.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return Graph(g, t, int(g.get_workspace_size()), sq, pad)


def _contiguous(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def graph_for(mod, device: torch.device, q_shape, k_shape, v_shape, strides, causal: bool,
              attn_scale: float) -> Graph:
    """The built graph for these shapes/strides (cached, refusals too); raises KernelRefused with the reason.
    A length the kernel refuses unpadded is retried padded to a multiple of 128 (padding mask)."""
    key = (id(mod), device.type, device.index, tuple(q_shape), tuple(k_shape), tuple(v_shape), tuple(strides),
           bool(causal), float(attn_scale))
    with _GRAPHS_LOCK:
        hit = _GRAPHS.get(key)
    if hit is None:
        try:
            hit = _build(mod, device, q_shape, k_shape, v_shape, strides, causal, attn_scale, 0)
        except Exception as e:  # noqa: BLE001 — the frontend raises its own types (cudnnGraphNotSupportedError...)
            hit = KernelRefused(short(e))
            pad = (-q_shape[2]) % PAD_TO
            if pad and q_shape[2] == k_shape[2]:
                try:
                    hit = _build(mod, device, q_shape, k_shape, v_shape, strides, causal, attn_scale, pad)
                except Exception as e2:  # noqa: BLE001
                    hit = KernelRefused(f"{short(e)}; padded to {q_shape[2] + pad}: {short(e2)}")
        if isinstance(hit, Graph):
            hit.key = key
        with _GRAPHS_LOCK:
            _GRAPHS[key] = hit
    if isinstance(hit, KernelRefused):
        raise hit
    return hit


def short(e: BaseException) -> str:
    """The exception in one line (its type and first line), for reports."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:200]}"


def _padded(x: torch.Tensor, pad: int) -> torch.Tensor:
    buf = torch.zeros(x.shape[0], x.shape[1], x.shape[2] + pad, x.shape[3], dtype=torch.uint8, device=x.device)
    buf = buf.view(FP8)
    buf[:, :, :x.shape[2]].copy_(x)
    return buf


BINDING = ["tensor"]  # how buffers are bound: torch tensors, or (if the frontend refuses those) raw pointers


def _execute(mod, g: Graph, pack: dict, workspace: torch.Tensor, handle) -> None:
    """Run the graph; bound as torch tensors, else once more as raw device pointers (every frontend version takes
    those: the declaration then describes the buffer; the tensors stay referenced by ``pack`` meanwhile)."""
    if BINDING[0] == "tensor":
        try:
            g.graph.execute(pack, workspace, handle=handle)
            return
        except Exception as e:  # noqa: BLE001 — the frontend's own error types
            BINDING[0] = f"pointers (tensors refused: {short(e)})"
    g.graph.execute({t: x.data_ptr() for t, x in pack.items()}, workspace.data_ptr(), handle=handle)


def attention(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
              descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor, *, attn_scale: float,
              causal: bool = False) -> tuple[torch.Tensor, Graph]:
    """One ``sdpa_fp8`` call on quantized inputs (see the module docstring): returns the FP8 output
    (B, H, S, Dv), contiguous, ≈ O · scale_o, and the graph that ran. Raises KernelRefused where the frontend
    refuses the shape, CudnnUnavailable without the frontend."""
    mod = load()
    device = q8.device
    q8, k8, v8 = (x if x.stride(-1) == 1 else x.contiguous() for x in (q8, k8, v8))
    strides = (tuple(q8.stride()), tuple(k8.stride()), tuple(v8.stride()))
    g = graph_for(mod, device, tuple(q8.shape), tuple(k8.shape), tuple(v8.shape), strides, causal, attn_scale)
    b, h, s, _ = q8.shape
    consts = _constants(device)
    t = g.tensors
    if g.pad:
        q8, k8, v8 = (_padded(x, g.pad) for x in (q8, k8, v8))
    o8 = torch.empty(b, h, s + g.pad, v8.shape[-1], dtype=FP8, device=device)
    amax = torch.empty(2, 1, 1, 1, 1, device=device)
    pack = {t["q"]: q8, t["k"]: k8, t["v"]: v8, t["descale_q"]: descale_q.reshape(1, 1, 1, 1),
            t["descale_k"]: descale_k.reshape(1, 1, 1, 1), t["descale_v"]: descale_v.reshape(1, 1, 1, 1),
            t["descale_s"]: consts["descale_s"], t["scale_s"]: consts["scale_s"],
            t["scale_o"]: scale_o.reshape(1, 1, 1, 1), t["o"]: o8, t["amax_s"]: amax[0], t["amax_o"]: amax[1]}
    if g.pad:
        lengths = torch.full((b, 1, 1, 1), s, dtype=torch.int32, device=device)
        pack[t["seq_q"]] = lengths
        pack[t["seq_kv"]] = lengths
    workspace = torch.empty(max(1, g.workspace), dtype=torch.uint8, device=device)
    _execute(mod, g, pack, workspace, _handle(mod, device))
    g.calls += 1
    if g.pad:
        o8 = o8[:, :, :s].contiguous()
    return o8, g
