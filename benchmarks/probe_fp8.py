"""Probe FP8 attention on Hopper for online FP8 (``fp8=True``): which maintained library runs it, how fast, how exact.

    python benchmarks/probe_fp8.py --out DIR [--quick] [--only NAME[,NAME...]] [--reps N] [--budget-s S]
    python benchmarks/probe_fp8.py --out DIR --cpu-selftest     # no GPU: the quantizers and the reference only

Candidates (each imported lazily; one that is missing or fails is recorded and the run goes on):
  cudnn_fe      nvidia-cudnn-frontend ``graph.sdpa_fp8``: FP8 Q/K/V with per-tensor descale tensors, P quantized
                in-kernel (scale_s / descale_s). Variants: per-tensor; per-head K and V folded around a per-tensor
                kernel (K's per-head scale multiplied into Q before Q is quantized, V's applied to O); per-head
                descale tensors (1, H, 1, 1) if the library accepts them; "+vm": V's per-channel mean taken out
                before and added to O after. Output bf16, else fp16, else fp8 (the frontend allows a bf16/fp16
                output only on Blackwell: on Hopper O is FP8, which costs ~2.5% relative L2 unless V is centered).
  cudnn_bsa     nvidia-cudnn-frontend ``block_sparse_attention_fp8_forward`` with every block kept (CuTe DSL
                kernels; needs nvidia-cutlass-dsl; Sage-style scales: per token Q, per 16 keys K, per channel V).
  torch_fa3     torch.nn.attention.experimental._scaled_dot_product_attention_quantized (per-head descales;
                needs the FA3 library ``flash_attn_interface``).
  torchao       torchao.prototype.attention (FA3 backend) and its fused Triton per-head (+Hadamard) quantizers.
  fa4           flash-attn-4 ``flash_attn.cute.flash_attn_func`` with FP8 inputs (needs nvidia-cutlass-dsl).
  sage1         sageattention 1.0.6 (Triton only: INT8 Q/K per block of 128 / 64 tokens, FP16 P·V).
  torch_native  what torch itself does with float8 Q/K/V (SDPA default and cuDNN backends).
  qdq           numerics only: float32 attention on fake-quantized Q/K/V (per tensor / per head / attnfx's NPU
                blocks of 128 queries and 256 keys / the folded per-head scheme) with P rounded to FP8.
Baselines: bf16 SDPA under ``sdpa_kernel(CUDNN_ATTENTION)`` and under the default selection.

Shapes: B=1, d=128, no mask, heads 12 and 40, 16384 / 32760 / 75600 tokens and a 4096-token sanity shape.
Per candidate and shape: median kernel ms (CUDA events, rotating input sets, after warm-up), the quantization
(+ Hadamard rotation of Q and K, ``attnfx.backends.npu.hadamard``) ms and the output post-processing ms
separately, and the relative L2 error of the output against a float32 reference computed on a subset of
query rows (``--ref-rows``), with and without the rotation, for three kinds of inputs (see ``make_qkv``):
i.i.d. normal (FP8's worst case: ~5% for any FP8 scheme, bf16 ~0.3%), K with outlier channels, and "biased"
(outlier channels plus per-channel means in K and V, closer to real DiT activations); ``--qkv FILE`` adds
activations captured from a model. Writes DIR/probe_fp8.json and prints a table last. ``--budget-s`` bounds
the whole run: what would not fit is skipped and recorded as such. ``--device cpu`` runs the driver on small
``--shapes`` without any kernel (for debugging it here).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
try:  # the NPU path's rotation and block quantizer, so that the numbers here are those of attnfx's scheme
    from attnfx.backends.npu import FP8_MAX, KV_BLOCK, Q_BLOCK, hadamard, quantize_blocks
    ATTNFX_NPU = "attnfx.backends.npu"
except ImportError as _e:  # the module moved: same definitions, recorded in the JSON
    import functools

    ATTNFX_NPU = f"local copy ({type(_e).__name__}: {_e})"
    Q_BLOCK, KV_BLOCK, FP8_MAX = 128, 256, 448.0

    @functools.lru_cache(maxsize=32)
    def hadamard(dim: int, device: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
        h = torch.ones(1, 1)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (dim,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
        return (signs[:, None] * h / math.sqrt(dim)).to(device=device, dtype=dtype)

    def quantize_blocks(x: torch.Tensor, block: int):
        b, n, s, d = x.shape
        xp = torch.nn.functional.pad(x.float(), (0, 0, 0, (-s) % block))
        blocks = xp.view(b, n, -1, block, d)
        scale = (blocks.abs().amax(dim=(-1, -2)) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        return (blocks / scale[..., None, None]).to(torch.float8_e4m3fn).view(b, n, -1, d), scale, s

D = 128
FP8 = torch.float8_e4m3fn
P_SCALE = 256.0  # P (<= 1) is multiplied by this before its FP8 rounding; a power of two, so exact
OUTLIER_CHANNELS = (3, 37, 64, 101)  # K channels scaled x10 in the "outlier_k" and "biased" inputs
KINDS = ("normal", "outlier_k", "biased")
FULL_SHAPES = [(1, 12, 4096), (1, 12, 16384), (1, 40, 16384), (1, 12, 32760), (1, 40, 32760), (1, 12, 75600),
               (1, 40, 75600)]
QUICK_SHAPES = [(1, 12, 4096), (1, 40, 16384), (1, 40, 75600)]
CANDIDATES = ("cudnn_fe", "cudnn_bsa", "torch_fa3", "torchao", "fa4", "sage1", "torch_native", "qdq")
DISTS = ("torch", "triton", "nvidia-cudnn-frontend", "nvidia-cudnn-cu13", "nvidia-cudnn-cu12", "flash-attn-4",
         "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-cu13", "torchao",
         "sageattention", "cuda-bindings", "apache-tvm-ffi", "quack-kernels")


def log(msg: str) -> None:
    print(f"[probe_fp8 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def short(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:300]}"


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def env() -> dict:
    from importlib import metadata

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "hadamard_from": ATTNFX_NPU, "versions": {}}
    for dist in DISTS:
        try:
            info["versions"][dist] = metadata.version(dist)
        except Exception:
            info["versions"][dist] = None
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        info.update(device=torch.cuda.get_device_name(dev), capability=list(torch.cuda.get_device_capability(dev)),
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    else:
        info["device"] = "cpu (no CUDA)"
    return info


# ----------------------------------------------------------------------------------------------- inputs, reference


def make_qkv(kind: str, b: int, h: int, s: int, seed: int, device) -> tuple:
    """normal: i.i.d. N(0, 1) — the worst case for any FP8 scheme: the output is an average of many V rows whose
    rounding errors do not cancel against any common part (FP8 e4m3 rounds N(0, 1) with a 2.6% relative L2 error,
    so no FP8 attention gets far below ~5% here). outlier_k: K's channels OUTLIER_CHANNELS x10. biased: outlier_k
    plus per-channel means in K (N(0, 1) per head and channel) and V (N(0, 2²)), as linear layers with biases give
    real DiT activations."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, D, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
    if kind in ("outlier_k", "biased"):  # a few large channels in K, as real models have (what the rotation spreads)
        k[..., list(OUTLIER_CHANNELS)] *= 10
    if kind == "biased":
        k += torch.randn(b, h, 1, D, generator=g, device=device, dtype=torch.bfloat16)
        v += 2 * torch.randn(b, h, 1, D, generator=g, device=device, dtype=torch.bfloat16)
    return q, k, v


def query_rows(s: int, n: int, device) -> torch.Tensor:
    if s <= n:
        return torch.arange(s, device=device)
    return torch.linspace(0, s - 1, n, device=device).round().long()


def attention_rows(q, k, v, rows, scale: float, p_fp8: bool = False) -> torch.Tensor:
    """softmax(q[rows] kᵀ·scale) v in float32 (no TF32), one (batch, head) at a time; optionally with P rounded to
    FP8 as the FP8 kernels do (P = exp(s - rowmax) ≤ 1, times P_SCALE, to e4m3 and back; the row sum unrounded)."""
    b, h = q.shape[:2]
    out = torch.empty(b, h, rows.numel(), v.shape[-1], device=q.device, dtype=torch.float32)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i in range(b):
            for j in range(h):
                s = (q[i, j, rows].float() @ k[i, j].float().T) * scale
                p = torch.exp(s - s.amax(-1, keepdim=True))
                total = p.sum(-1, keepdim=True)
                if p_fp8:
                    p = (p * P_SCALE).to(FP8).float() / P_SCALE
                out[i, j] = (p @ v[i, j].float()) / total
                del s, p
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out


def rel_l2(out_rows: torch.Tensor, ref: torch.Tensor) -> float:
    diff = out_rows.float() - ref
    if not torch.isfinite(diff).all():
        return float("nan")
    return float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref))


# ------------------------------------------------------------------------------------------------- our quantizers


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x · diag(r)·H/√d (attnfx's cached random-sign Hadamard), in x's dtype."""
    return x @ hadamard(x.shape[-1], str(x.device), x.dtype)


def fp8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (fp8, float32 scale of shape ()), x ≈ fp8·scale, scale = amax/448."""
    xf = x.float()
    scale = (xf.abs().amax() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (xf / scale).to(FP8), scale


def fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, S, D) -> (fp8, float32 scales (B, H, 1, 1))."""
    xf = x.float()
    scale = (xf.abs().amax(dim=(-1, -2), keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (xf / scale).to(FP8), scale


def fake_quant(x: torch.Tensor, gran: str, block: int = 0) -> torch.Tensor:
    """FP8 round trip in float32: per tensor, per (batch, head), or in blocks of ``block`` tokens per (batch, head)
    exactly as attnfx's NPU path quantizes (``attnfx.backends.npu.quantize_blocks``)."""
    if gran == "tensor":
        x8, s = fp8_per_tensor(x)
        return x8.float() * s
    if gran == "head":
        x8, s = fp8_per_head(x)
        return x8.float() * s
    b, h, n, d = x.shape
    x8, s, _ = quantize_blocks(x, block)
    return (x8.float().view(b, h, -1, block, d) * s[..., None, None]).view(b, h, -1, d)[:, :, :n]


def prep_cudnn(q, k, v, gran: str, rot: bool, vmean: bool = False) -> dict:
    """Q/K/V for a kernel that takes one descale per tensor (cuDNN sdpa_fp8), plus what the output needs after.

    tensor: Q, K, V each per tensor; V's scale is passed to the kernel (no post-processing for a bf16 output).
    fold:   K and V per (batch, head) around the per-tensor kernel: K's per-head scale is multiplied into Q before
            Q is quantized per tensor (q·kᵀ = (q·s_k)·(k/s_k)ᵀ), V's is applied to O per head afterwards.
    head:   Q, K, V each per (batch, head), for a kernel that accepts (1, H, 1, 1) descale tensors.
    vmean:  V's mean over the tokens (per head and channel) taken out before quantizing and added to O after —
            exact, since each softmax row sums to 1 — so that an FP8 output holds only the varying part of O.
    """
    if rot:
        q, k = rotate(q), rotate(k)
    mean = None
    if vmean:
        mean = v.float().mean(dim=2, keepdim=True)
        v = v.float() - mean
    if gran == "tensor":
        q8, sq = fp8_per_tensor(q)
        k8, sk = fp8_per_tensor(k)
        v8, sv = fp8_per_tensor(v)
        return dict(q=q8, k=k8, v=v8, dq=sq, dk=sk, dv=sv, post=None, mean=mean)
    if gran == "fold":
        k8, sk = fp8_per_head(k)
        q8, sq = fp8_per_tensor(q.float() * sk)
        v8, sv = fp8_per_head(v)
        return dict(q=q8, k=k8, v=v8, dq=sq, dk=torch.ones_like(sq), dv=torch.ones_like(sq), post=sv, mean=mean)
    if gran == "head":
        q8, sq = fp8_per_head(q)
        k8, sk = fp8_per_head(k)
        v8, sv = fp8_per_head(v)
        return dict(q=q8, k=k8, v=v8, dq=sq, dk=sk, dv=sv, post=None, mean=mean)
    raise ValueError(gran)


def finish(o: torch.Tensor, post, mean) -> torch.Tensor:
    """The kernel's output to bf16: times the V scale(s) left out of the kernel, plus V's mean if taken out."""
    if post is None and mean is None:
        return o if o.dtype == torch.bfloat16 else o.to(torch.bfloat16)
    y = o.float()
    if post is not None:
        y = y * post
    if mean is not None:
        y = y + mean
    return y.to(torch.bfloat16)


def qdq_attention(q, k, v, rows, gran: str, rot: bool, p_fp8: bool = True, o_fp8: bool = False,
                  vmean: bool = False) -> torch.Tensor:
    """Numerics of an FP8 kernel with the given scale granularity, in float32 on the reference rows: Q/K/V (and P)
    rounded to e4m3, optionally O too (per head, |O| <= max|V|: what cuDNN's FP8-only output on Hopper does), and
    optionally with V's mean taken out before and added back after (see prep_cudnn)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if rot:
        q, k = rotate(q.float()), rotate(k.float())
    mean = v.float().mean(dim=2, keepdim=True) if vmean else None
    if vmean:
        v = v.float() - mean
    if gran == "npu-block":
        qf, kf, vf = fake_quant(q, "block", Q_BLOCK), fake_quant(k, "block", KV_BLOCK), fake_quant(v, "block", KV_BLOCK)
    elif gran == "fold":
        p = prep_cudnn(q, k, v, "fold", False)
        qf, kf = p["q"].float() * p["dq"], p["k"].float()
        vf = p["v"].float() * p["post"]
    else:
        qf, kf, vf = fake_quant(q, gran), fake_quant(k, gran), fake_quant(v, gran)
    o = attention_rows(qf, kf, vf, rows, scale, p_fp8=p_fp8)
    if o_fp8:
        so = (vf.abs().amax(dim=(-1, -2), keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        o = (o / so).to(FP8).float() * so
    return o if mean is None else o + mean


# (granularity, rotate, P rounded, O rounded, V mean out)
QDQ_VARIANTS = [("tensor", False, True, False, False), ("tensor", True, True, False, False),
                ("fold", False, True, False, False), ("fold", True, True, False, False),
                ("head", False, True, False, False), ("head", True, True, False, False),
                ("npu-block", False, True, False, False), ("npu-block", True, True, False, False),
                ("npu-block", True, False, False, False), ("npu-block", True, True, False, True),
                ("fold", True, True, True, False), ("fold", True, True, True, True)]


def qdq_name(gran: str, rot: bool, p8: bool, o8: bool, vm: bool) -> str:
    return gran + ("+had" if rot else "") + ("+o8" if o8 else "") + ("+vm" if vm else "") + ("" if p8 else " p-exact")


# -------------------------------------------------------------------------------------------------------- timing


TIMING = {"host_clock": False}  # --device cpu (debugging the driver): host clock instead of CUDA events


def bench(calls: list, reps: int, warmup: int = 3) -> dict:
    """Median / min ms of single calls (CUDA events around each), cycling through ``calls`` (one per input set)."""
    if TIMING["host_clock"]:
        t = []
        for i in range(reps):
            t0 = time.perf_counter()
            calls[i % len(calls)]()
            t.append((time.perf_counter() - t0) * 1e3)
        t.sort()
        return {"median_ms": t[len(t) // 2], "min_ms": t[0], "reps": reps}
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        calls[i % len(calls)]()
        ends[i].record()
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return {"median_ms": t[len(t) // 2], "min_ms": t[0], "reps": reps}


class Shape:
    """The inputs of one shape: ``sets`` rotating normal input sets for timing; one input set per kind for the
    errors, with the float32 reference on ``rows``. With ``qkv`` (loaded from --qkv), that one set is both."""

    def __init__(self, b: int, h: int, s: int, args, device, qkv: tuple | None = None):
        self.b, self.h, self.s, self.d = b, h, s, D
        self.name = f"{b}x{h}x{s}" + ("(file)" if qkv is not None else "")
        self.scale = 1.0 / math.sqrt(D)
        self.flops = 4.0 * b * h * s * s * D
        self.reps = args.reps
        if qkv is not None:
            self.kinds = ("file",)
            self.sets = [qkv]
            self.acc = {"file": qkv}
        else:
            self.kinds = KINDS
            n_sets = 2 if b * h * s * D * 2 > 2**29 else 3  # two sets above 512 MiB a tensor: they miss L2 anyway
            self.sets = [make_qkv("normal", b, h, s, 1000 + i, device) for i in range(n_sets)]
            self.acc = {"normal": self.sets[0]}
            self.acc.update({kind: make_qkv(kind, b, h, s, 2000 + i, device) for i, kind in enumerate(KINDS[1:])})
        self.rows = query_rows(s, args.ref_rows, device)
        self.ref = {kind: attention_rows(*self.acc[kind], self.rows, self.scale) for kind in self.kinds}
        self.base = {}  # baseline name -> row

    @property
    def first(self) -> tuple:
        """The first kind's inputs and reference (normal, or the file's)."""
        return self.acc[self.kinds[0]], self.ref[self.kinds[0]]

    def errors(self, run) -> dict:
        """{kind: rel L2} of run(q, k, v) -> (B, H, S, D) output, on the reference rows."""
        out = {}
        for kind in self.kinds:
            o = run(*self.acc[kind])
            out[kind] = rel_l2(o[:, :, self.rows], self.ref[kind])
            del o
        return out


def row(shape: Shape, candidate: str, variant: str, **kw) -> dict:
    r = {"shape": shape.name, "b": shape.b, "h": shape.h, "s": shape.s, "d": shape.d, "candidate": candidate,
         "variant": variant, "kernel_ms": None, "quant_ms": None, "post_ms": None, "err": {}}
    r.update(kw)
    return r


def baselines(shape: Shape) -> list:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    q, k, v = shape.sets[0]
    choice = SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=None, enable_gqa=False)).name
    for name, ctx in (("sdpa_cudnn", lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)), ("sdpa_default", None)):
        def run(q, k, v, ctx=ctx):
            if ctx is None:
                return F.scaled_dot_product_attention(q, k, v)
            with ctx():
                return F.scaled_dot_product_attention(q, k, v)
        try:
            t = bench([lambda s=s: run(*s) for s in shape.sets], shape.reps)
            r = row(shape, name, "bf16" if ctx else f"bf16 {choice.split('_')[0].lower()}", kernel_ms=t["median_ms"],
                    kernel_min_ms=t["min_ms"], err=shape.errors(run),
                    tflops=shape.flops / t["median_ms"] / 1e9)
        except Exception as e:
            r = row(shape, name, "bf16", error=short(e))
        shape.base[name] = r
        rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------------- candidates


class Candidate:
    name = ""
    api = ""
    granularity = ""

    def __init__(self, args):
        self.args = args
        self.info = {"api": self.api, "granularity": self.granularity, "available": None, "error": None,
                     "notes": []}
        self.ok = None  # None: setup not tried; True / False

    def setup(self) -> None:  # raise if unusable
        pass

    def ensure(self) -> bool:
        if self.ok is None:
            try:
                self.setup()
                self.ok = True
            except BaseException as e:  # noqa: BLE001 — an import can fail in many ways (OSError, SystemExit...)
                if isinstance(e, KeyboardInterrupt):
                    raise
                self.ok = False
                self.info["error"] = short(e)
                self.info["traceback"] = traceback.format_exc(limit=6)
            self.info["available"] = self.ok
        return self.ok

    def run(self, shape: Shape) -> list:
        return []


def _expose_torch_cudnn() -> str | None:
    """Let the cuDNN frontend load the libcudnn torch already loaded (it looks in LD_LIBRARY_PATH first)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "libcudnn.so" in ln and "/" in ln}
    except OSError:
        return None
    for p in sorted(paths):
        if os.path.basename(p).startswith("libcudnn.so"):
            d = os.path.dirname(p)
            if d not in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
                os.environ["LD_LIBRARY_PATH"] = d + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")
            return p
    return None


class CudnnFE(Candidate):
    name = "cudnn_fe"
    api = ("cudnn.pygraph(io_data_type=FP8_E4M3, intermediate/compute FLOAT).sdpa_fp8(q, k, v, descale_q, descale_k, "
           "descale_v, descale_s, scale_s, scale_o, attn_scale=, generate_stats=False) -> (O, Stats, Amax_S, Amax_O); "
           "validate / build_operation_graph / create_execution_plans([A, FALLBACK]) / check_support / build_plans; "
           "execute({tensor: buffer}, workspace, handle=)")
    granularity = "per tensor (descale tensors (1,1,1,1)); per-head K/V by folding; (1,H,1,1) probed"
    OUT_DTYPES = (("bf16", torch.bfloat16, "BFLOAT16"), ("fp16", torch.float16, "HALF"), ("fp8", FP8, "FP8_E4M3"))

    def setup(self):
        self.info["libcudnn"] = _expose_torch_cudnn()
        if self.args.cudnn_path:
            sys.path.insert(0, self.args.cudnn_path)
        import cudnn

        self.cudnn = cudnn
        self.info.update(frontend=getattr(cudnn, "__version__", "?"), module=cudnn.__file__,
                         backend=cudnn.backend_version())
        self.handle = cudnn.create_handle()
        cudnn.set_stream(self.handle, torch.cuda.current_stream().cuda_stream)
        self.graphs = {}
        self.out = None  # (name, torch dtype, cudnn dtype name), chosen at the first shape
        self.bind = "tensor"
        self.head_descale = None  # None untested, True/False

    # --- graph
    def graph(self, b, h, s, out, descale_heads: int = 1, pad: int = 0):
        key = (b, h, s, out[0], descale_heads, pad)
        if key in self.graphs:
            if isinstance(self.graphs[key], Exception):
                raise self.graphs[key]
            return self.graphs[key]
        try:
            self.graphs[key] = self._build(b, h, s, out, descale_heads, pad)
        except Exception as e:
            self.graphs[key] = e
            raise
        return self.graphs[key]

    def _build(self, b, h, s, out, descale_heads, pad):
        cudnn = self.cudnn
        dt = cudnn.data_type
        sp = s + pad
        g = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                          handle=self.handle)
        dims, strides = [b, h, sp, D], [h * sp * D, sp * D, D, 1]
        t = {n: g.tensor(name=n, dim=dims, stride=strides, data_type=dt.FP8_E4M3) for n in ("q", "k", "v")}
        sdims = [1, descale_heads, 1, 1]
        for n in ("descale_q", "descale_k", "descale_v"):
            t[n] = g.tensor(name=n, dim=sdims, stride=[descale_heads, 1, 1, 1], data_type=dt.FLOAT)
        for n in ("descale_s", "scale_s", "scale_o"):
            t[n] = g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT)
        kw = dict(q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
                  descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
                  generate_stats=False, attn_scale=1.0 / math.sqrt(D), use_causal_mask=False)
        if pad:
            for n in ("seq_q", "seq_kv"):
                t[n] = g.tensor(name=n, dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.INT32)
            kw.update(use_padding_mask=True, seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"])
        outs = g.sdpa_fp8(**kw)
        t["o"], t["amax_s"], t["amax_o"] = outs[0], outs[2], outs[3]
        t["o"].set_output(True).set_dim(dims).set_stride(strides).set_data_type(getattr(dt, out[2]))
        for n in ("amax_s", "amax_o"):
            t[n].set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        dev = torch.device("cuda")
        bufs = {"amax_s": torch.zeros(1, 1, 1, 1, device=dev), "amax_o": torch.zeros(1, 1, 1, 1, device=dev),
                "descale_s": torch.full((1, 1, 1, 1), 1.0 / P_SCALE, device=dev),
                "scale_s": torch.full((1, 1, 1, 1), P_SCALE, device=dev)}
        if pad:
            bufs["seq_q"] = torch.full((b, 1, 1, 1), s, dtype=torch.int32, device=dev)
            bufs["seq_kv"] = torch.full((b, 1, 1, 1), s, dtype=torch.int32, device=dev)
        ws = torch.empty(max(1, g.get_workspace_size()), dtype=torch.uint8, device=dev)
        return {"g": g, "t": t, "bufs": bufs, "ws": ws, "pad": pad, "out": out, "heads": descale_heads}

    # --- execution
    def _b(self, x):
        if self.bind == "ptr":
            return x.data_ptr()
        if self.bind == "uint8" and x.dtype == FP8:
            return x.view(torch.uint8)
        return x

    def pack(self, G, p: dict, o: torch.Tensor, so: torch.Tensor) -> dict:
        """The variant pack of one call (built outside the timed region)."""
        t, bufs, heads = G["t"], G["bufs"], G["heads"]

        def sc(x):
            x = x.reshape(-1).float()
            x = x[:heads] if x.numel() >= heads else x[:1].expand(heads)
            return x.reshape(1, heads, 1, 1).contiguous()

        pk = {t["q"]: p["q"], t["k"]: p["k"], t["v"]: p["v"], t["descale_q"]: sc(p["dq"]),
              t["descale_k"]: sc(p["dk"]), t["descale_v"]: sc(p["dv"]), t["descale_s"]: bufs["descale_s"],
              t["scale_s"]: bufs["scale_s"], t["scale_o"]: so, t["o"]: o, t["amax_s"]: bufs["amax_s"],
              t["amax_o"]: bufs["amax_o"]}
        if G["pad"]:
            pk[t["seq_q"]], pk[t["seq_kv"]] = bufs["seq_q"], bufs["seq_kv"]
        keep = list(pk.values())  # the buffers must outlive a pack of raw pointers
        pk = {k_: self._b(v_) for k_, v_ in pk.items()}
        pk["__keep__"] = keep
        return pk

    def execute(self, G, pk: dict) -> None:
        G["g"].execute({k_: v_ for k_, v_ in pk.items() if not isinstance(k_, str)}, G["ws"], handle=self.handle)

    @staticmethod
    def padded(p: dict, pad: int) -> dict:
        if not pad:
            return p
        out = dict(p)
        for n in ("q", "k", "v"):
            x = p[n]
            buf = torch.zeros(*x.shape[:2], x.shape[2] + pad, x.shape[3], dtype=torch.uint8, device=x.device).view(FP8)
            buf[:, :, :x.shape[2]].copy_(x)
            out[n] = buf
        return out

    @staticmethod
    def scales_for(p: dict, out_name: str):
        """(scale_o (1,1,1,1), post scale or None). An fp8 O is stored divided by max(descale_v) (|O| <= max|V|)."""
        if out_name == "fp8":
            m = p["dv"].float().max().reshape(())
            return (1.0 / m).reshape(1, 1, 1, 1), (m if p["post"] is None else m * p["post"])
        return torch.ones(1, 1, 1, 1, device=p["q"].device), p["post"]

    def run_variant(self, shape: Shape, G, p: dict) -> torch.Tensor:
        """One call on prepared inputs, the output cropped, de-scaled and cast to bf16."""
        out = G["out"]
        p = self.padded(p, G["pad"])
        o = torch.empty(shape.b, shape.h, shape.s + G["pad"], D, dtype=out[1], device=p["q"].device)
        so, post = self.scales_for(p, out[0])
        self.execute(G, self.pack(G, p, o, so))
        return finish(o[:, :, :shape.s], post, p.get("mean"))

    def shape_graph(self, shape: Shape, out, heads: int = 1):
        """The graph for this shape: unpadded, else (S not a multiple of 128) padded with a padding mask."""
        try:
            return self.graph(shape.b, shape.h, shape.s, out, heads, 0)
        except Exception:
            if shape.s % 128 == 0:
                raise
            return self.graph(shape.b, shape.h, shape.s, out, heads, (-shape.s) % 128)

    def choose_out(self, shape: Shape) -> None:
        """The first output dtype (bf16, fp16, fp8) that builds and gives a sane result, and a buffer binding."""
        attempts = []
        (q, k, v), ref = shape.first
        p = prep_cudnn(q, k, v, "tensor", False)
        for out in self.OUT_DTYPES:
            try:
                G = self.shape_graph(shape, out)
            except Exception as e:
                attempts.append({"out": out[0], "stage": "build", "error": short(e)})
                continue
            for bind in ("tensor", "uint8", "ptr"):
                self.bind = bind
                try:
                    o = self.run_variant(shape, G, p)
                    torch.cuda.synchronize()
                except Exception as e:
                    attempts.append({"out": out[0], "bind": bind, "stage": "execute", "error": short(e)})
                    continue
                err = rel_l2(o[:, :, shape.rows], ref)
                attempts.append({"out": out[0], "bind": bind, "pad": G["pad"], "rel_l2": err})
                if not math.isnan(err) and err < 0.5:
                    self.out = out
                    self.info["mode"] = {"out": out[0], "bind": bind, "shape": shape.name}
                    self.info["mode_attempts"] = attempts
                    return
                break  # it ran but the numbers are wrong: another binding would not change them
        self.info["mode_attempts"] = attempts
        raise RuntimeError("no output dtype worked: " + json.dumps(attempts)[:700])

    def run(self, shape: Shape) -> list:
        if self.out is None:
            self.choose_out(shape)
        out = self.out
        G = self.shape_graph(shape, out)
        pad = G["pad"]
        rows = []
        o = torch.empty(shape.b, shape.h, shape.s + pad, D, dtype=out[1], device="cuda")

        def time_kernel(GG, gran):
            og = o if GG["pad"] == pad else torch.empty(shape.b, shape.h, shape.s + GG["pad"], D, dtype=out[1],
                                                        device="cuda")
            ps = [self.padded(prep_cudnn(*st, gran, False), GG["pad"]) for st in shape.sets]
            pks = [self.pack(GG, p_, og, self.scales_for(p_, out[0])[0]) for p_ in ps]
            return bench([lambda pk=pk: self.execute(GG, pk) for pk in pks], shape.reps)

        t = time_kernel(G, "tensor")  # timed once: the descale values and the rotation do not change the kernel
        # (granularity, Hadamard on Q/K, V's mean out): +vm matters when O is FP8 (Hopper), see prep_cudnn
        variants = [("tensor", False, False), ("tensor", True, False), ("fold", False, False), ("fold", True, False),
                    ("tensor", True, True), ("fold", True, True)]
        if self.head_descale is None:
            self.head_descale = self._probe_head_descale(shape, out)
        if self.head_descale:
            variants += [("head", True, False), ("head", True, True)]
        th = None
        for gran, rot, vm in variants:
            name = gran + ("+had" if rot else "") + ("+vm" if vm else "")
            try:
                GG = G
                if gran == "head":
                    GG = self.shape_graph(shape, out, shape.h)
                    th = th or time_kernel(GG, "head")
                tk = th if gran == "head" else t
                tq = bench([lambda st=st, g=gran, r=rot, m=vm: prep_cudnn(*st, g, r, m) for st in shape.sets],
                           shape.reps)
                p0 = prep_cudnn(*shape.sets[0], gran, rot, vm)
                _, post = self.scales_for(p0, out[0])
                mean = p0["mean"]
                del p0
                o0 = o[:, :, :shape.s]
                if post is None and mean is None and out[1] == torch.bfloat16:
                    tp = {"median_ms": 0.0}
                else:
                    tp = bench([lambda o0=o0, post=post, mean=mean: finish(o0, post, mean)], shape.reps)
                err = shape.errors(lambda q, k, v, G_=GG, g=gran, r=rot, m=vm:
                                   self.run_variant(shape, G_, prep_cudnn(q, k, v, g, r, m)))
                rows.append(row(shape, self.name, name, granularity=gran, rotate=rot, vmean=vm,
                                kernel_ms=tk["median_ms"],
                                kernel_min_ms=tk["min_ms"], quant_ms=tq["median_ms"], post_ms=tp["median_ms"],
                                err=err, out_dtype=out[0], pad=GG["pad"], tflops=shape.flops / tk["median_ms"] / 1e9))
            except Exception as e:
                rows.append(row(shape, self.name, name, error=short(e)))
        return rows

    def _probe_head_descale(self, shape: Shape, out) -> bool:
        """Does a (1, H, 1, 1) descale tensor work, per head? Heads scaled by 1/4 ... 4 so that one shared value
        would show; compared with the per-tensor graph on the same inputs."""
        try:
            G = self.shape_graph(shape, out, shape.h)
            f = (2.0 ** (torch.arange(shape.h, device="cuda") % 5 - 2)).to(torch.bfloat16).reshape(1, -1, 1, 1)
            q, k, v = (x * f for x in shape.first[0])
            ref = attention_rows(q, k, v, shape.rows, shape.scale)
            err = rel_l2(self.run_variant(shape, G, prep_cudnn(q, k, v, "head", False))[:, :, shape.rows], ref)
            err_t = rel_l2(self.run_variant(shape, self.shape_graph(shape, out), prep_cudnn(q, k, v, "tensor", False))
                           [:, :, shape.rows], ref)
            self.info["head_descale"] = {"builds": True, "rel_l2_heads_scaled": err, "rel_l2_per_tensor_same": err_t}
            return not math.isnan(err) and err < 0.5
        except Exception as e:
            self.info["head_descale"] = {"builds": False, "error": short(e)}
            return False


class CudnnBSA(Candidate):
    name = "cudnn_bsa"
    api = ("cudnn.block_sparse_attention.block_sparse_attention_fp8_forward(q, k, v, q2k_block_index (B,H,nQ,nK) "
           "int32, block_sparse_num, softmax_scale=, sparse_block_size=128) -> {'o_tensor'}; bf16 BHSD in, quantizes "
           "inside")
    granularity = "Sage-style: per token Q, per 16 keys K, per channel V (inside the op)"

    def setup(self):
        _expose_torch_cudnn()
        if self.args.cudnn_path:
            sys.path.insert(0, self.args.cudnn_path)
        from cudnn.block_sparse_attention import block_sparse_attention_fp8_forward

        importlib.import_module("cudnn.block_sparse_attention._interface")  # the CuTe DSL kernels (cutlass)
        self.fn = block_sparse_attention_fp8_forward

    def call(self, q, k, v):
        b, h, s, _ = q.shape
        n = s // 128
        idx = torch.arange(n, dtype=torch.int32, device=q.device).expand(b, h, n, n).contiguous()
        res = self.fn(q.contiguous(), k.contiguous(), v.contiguous(), idx, n, softmax_scale=1.0 / math.sqrt(D),
                      sparse_block_size=128)
        if torch.is_tensor(res):
            return res
        return res["o_tensor"] if "o_tensor" in res else res[0]

    def run(self, shape: Shape) -> list:
        if shape.s % 128:
            return [row(shape, self.name, "sage-fp8", error=f"skipped: SM90 needs S % 128 == 0 (S={shape.s})")]
        rows = []
        t = bench([lambda st=st: self.call(*st) for st in shape.sets], shape.reps)
        for rot in (False, True):
            run = (lambda q, k, v: self.call(rotate(q), rotate(k), v)) if rot else self.call  # noqa: B023
            tr = bench([lambda st=st: (rotate(st[0]), rotate(st[1])) for st in shape.sets], shape.reps) if rot else None
            rows.append(row(shape, self.name, "sage-fp8" + ("+had" if rot else ""), granularity="sage", rotate=rot,
                            kernel_ms=t["median_ms"], kernel_min_ms=t["min_ms"],
                            quant_ms=tr["median_ms"] if tr else 0.0, post_ms=0.0, err=shape.errors(run),
                            note="kernel_ms includes the op's own quantization"))
        return rows


class TorchFA3(Candidate):
    name = "torch_fa3"
    api = ("torch.nn.attention.activate_flash_attention_impl('FA3'); with sdpa_kernel(FLASH_ATTENTION): "
           "torch.nn.attention.experimental._scaled_dot_product_attention_quantized(q8, k8, v8, q_descale=(B,Hkv), "
           "k_descale=, v_descale=) -> bf16")
    granularity = "per (batch, kv head)"

    def setup(self):
        import torch.nn.attention as tna
        from torch.nn.attention.experimental._scaled_dot_product_attention_quantized import (
            _scaled_dot_product_attention_quantized,
        )

        self.fn = _scaled_dot_product_attention_quantized
        try:
            self.info["impls"] = list(tna.list_flash_attention_impls())
        except Exception as e:
            self.info["impls"] = short(e)
        try:
            m = importlib.import_module("torch.nn.attention.experimental._scaled_dot_product_attention_quantized")
            self.info["descale_types"] = [x.name for x in m.DescaleType]
        except Exception as e:
            self.info["descale_types"] = short(e)
        tna.activate_flash_attention_impl("FA3")  # imports flash_attn_interface (the FA3 build)
        self.tna = tna

    def call(self, p):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return self.fn(p["q"], p["k"], p["v"], q_descale=p["dq"], k_descale=p["dk"], v_descale=p["dv"])

    @staticmethod
    def prep(q, k, v, rot):
        if rot:
            q, k = rotate(q), rotate(k)
        out = {}
        for n, x in (("q", q), ("k", k), ("v", v)):
            x8, s = fp8_per_head(x)
            out[n], out["d" + n] = x8, s.reshape(x.shape[0], x.shape[1]).contiguous()
        return out

    def run(self, shape: Shape) -> list:
        rows = []
        packs = [self.prep(*st, False) for st in shape.sets]
        t = bench([lambda p=p: self.call(p) for p in packs], shape.reps)
        del packs
        for rot in (False, True):
            tq = bench([lambda st=st, r=rot: self.prep(*st, r) for st in shape.sets], shape.reps)
            rows.append(row(shape, self.name, "head" + ("+had" if rot else ""), granularity="head", rotate=rot,
                            kernel_ms=t["median_ms"], kernel_min_ms=t["min_ms"], quant_ms=tq["median_ms"],
                            post_ms=0.0, err=shape.errors(lambda q, k, v, r=rot: self.call(self.prep(q, k, v, r)))))
        return rows


class TorchAO(Candidate):
    name = "torchao"
    api = ("torchao.prototype.attention.apply_low_precision_attention(model, backend=AttentionBackend.FP8_FA3, "
           "hadamard=HadamardMode.NONE|QKV|V_ONLY) (FA3 only); quantizers: torchao.prototype.attention.quantization."
           "triton_qkv_quantization.triton_fp8_sdpa_quantize(q, k, v), triton_hadamard_qkv_quantization."
           "triton_fp8_hadamard_sdpa_quantize(q, k, v) -> (q8, k8, v8, q_descale, k_descale, v_descale (B,H))")
    granularity = "per (batch, head), FA3 kernel"

    def setup(self):
        import torchao

        self.info["version"] = getattr(torchao, "__version__", "?")
        try:
            from torchao.prototype.attention.utils import _is_fa3_available

            self.info["fa3_available"] = bool(_is_fa3_available())
            if not self.info["fa3_available"]:
                self.info["notes"].append("FP8_FA3 backend unusable: flash_attn_interface (FA3) is not importable")
        except Exception as e:
            self.info["fa3_available"] = short(e)
        self.quantizers = {}
        try:
            from torchao.prototype.attention.quantization.triton_qkv_quantization import triton_fp8_sdpa_quantize

            self.quantizers["head"] = triton_fp8_sdpa_quantize
        except Exception as e:
            self.info["notes"].append("triton_fp8_sdpa_quantize: " + short(e))
        try:
            from torchao.prototype.attention.quantization.triton_hadamard_qkv_quantization import (
                triton_fp8_hadamard_sdpa_quantize,
            )

            self.quantizers["head+had"] = triton_fp8_hadamard_sdpa_quantize
        except Exception as e:
            self.info["notes"].append("triton_fp8_hadamard_sdpa_quantize: " + short(e))
        if not self.quantizers:
            raise RuntimeError("neither the FA3 backend nor its Triton quantizers are usable")

    def run(self, shape: Shape) -> list:
        rows = []
        for name, fn in self.quantizers.items():
            try:
                t = bench([lambda st=st, fn=fn: fn(*st) for st in shape.sets], shape.reps)
                rows.append(row(shape, self.name, "quant " + name, granularity="head", quant_ms=t["median_ms"],
                                note="fused Triton Q/K/V quantization only (its kernel is FA3's)"))
            except Exception as e:
                rows.append(row(shape, self.name, "quant " + name, error=short(e)))
        return rows


class FA4(Candidate):
    name = "fa4"
    api = ("flash_attn.cute.flash_attn_func(q, k, v (B,S,H,D) fp8, softmax_scale=, scales=TensorwiseScales(q=, k=, "
           "v=) with (B,Hkv) fp32 descales) -> (out bf16, lse)")
    granularity = "per (batch, kv head)"

    def setup(self):
        import flash_attn.cute as fa

        self.fa = fa
        self.info["version"] = getattr(fa, "__version__", "?")

    def run(self, shape: Shape) -> list:
        (q, k, v), ref = shape.first
        p = TorchFA3.prep(q, k, v, False)
        t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
        try:
            res = self.fa.flash_attn_func(t(p["q"]), t(p["k"]), t(p["v"]), softmax_scale=1.0 / math.sqrt(D),
                                          scales=self.fa.TensorwiseScales(q=p["dq"], k=p["dk"], v=p["dv"]))
            o = (res[0] if isinstance(res, tuple) else res).transpose(1, 2)
            err = rel_l2(o[:, :, shape.rows], ref)
            return [row(shape, self.name, "head", err={shape.kinds[0]: err}, note="ran (timing not implemented)")]
        except Exception as e:
            return [row(shape, self.name, "head", error=short(e))]


class Sage1(Candidate):
    name = "sage1"
    api = ("sageattention.sageattn(q, k, v, tensor_layout='HND', is_causal=False, sm_scale=None, smooth_k=True) "
           "(mutates k in place when smooth_k); internals: quant_per_block.per_block_int8(q, k) and "
           "attn_qk_int8_per_block.forward(q8, k8, v16, q_scale, k_scale, tensor_layout, output_dtype)")
    granularity = "INT8 Q per 128 tokens, K per 64 tokens (K mean-smoothed), V fp16"

    def setup(self):
        import sageattention
        from sageattention.attn_qk_int8_per_block import forward
        from sageattention.quant_per_block import per_block_int8

        self.sage, self.attn, self.quant = sageattention.sageattn, forward, per_block_int8

    def prep(self, q, k, v, rot):
        if rot:
            q, k = rotate(q), rotate(k)
        k = k - k.mean(dim=2, keepdim=True)
        q8, qs, k8, ks = self.quant(q, k, sm_scale=1.0 / math.sqrt(D), tensor_layout="HND")
        return q8, k8, v.to(torch.float16), qs, ks

    def kernel(self, p):
        return self.attn(*p, tensor_layout="HND", output_dtype=torch.bfloat16)

    def full(self, q, k, v, rot):
        if rot:
            q, k = rotate(q), rotate(k)
        return self.sage(q, k.clone(), v, tensor_layout="HND", is_causal=False)

    def run(self, shape: Shape) -> list:
        rows = []
        packs = [self.prep(*st, False) for st in shape.sets]
        t = bench([lambda p=p: self.kernel(p) for p in packs], shape.reps)
        del packs
        scratch = [(q, k.clone(), v) for q, k, v in shape.sets]
        tf = bench([lambda st=st: self.sage(*st, tensor_layout="HND") for st in scratch], shape.reps)
        del scratch
        for rot in (False, True):
            tq = bench([lambda st=st, r=rot: self.prep(*st, r) for st in shape.sets], shape.reps)
            rows.append(row(shape, self.name, "int8-blk" + ("+had" if rot else ""), granularity="block-int8",
                            rotate=rot, kernel_ms=t["median_ms"], kernel_min_ms=t["min_ms"], quant_ms=tq["median_ms"],
                            post_ms=0.0, sageattn_ms=tf["median_ms"],
                            err=shape.errors(lambda q, k, v, r=rot: self.full(q, k, v, r))))
        return rows


class TorchNative(Candidate):
    name = "torch_native"
    api = "F.scaled_dot_product_attention(q8, k8, v8) with float8_e4m3fn inputs (default, cuDNN and flash backends)"
    granularity = "none (SDPA has no descale arguments)"

    def run(self, shape: Shape) -> list:
        if shape.s > 4096:
            return []
        from torch.nn.attention import SDPBackend, sdpa_kernel

        p = prep_cudnn(*shape.first[0], "tensor", False)
        rows = []
        try:
            choice = SDPBackend(torch._fused_sdp_choice(p["q"], p["k"], p["v"], None, 0.0, False, scale=None,
                                                        enable_gqa=False)).name
        except Exception as e:
            choice = short(e)
        for name, be in (("sdpa fp8 default", None), ("sdpa fp8 cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("sdpa fp8 flash", SDPBackend.FLASH_ATTENTION)):
            try:
                if be is None:
                    o = F.scaled_dot_product_attention(p["q"], p["k"], p["v"])
                else:
                    with sdpa_kernel(be):
                        o = F.scaled_dot_product_attention(p["q"], p["k"], p["v"])
                torch.cuda.synchronize()
                rows.append(row(shape, self.name, name, note=f"ran: out {o.dtype}, selector {choice}; no descale "
                                                             "arguments, so no usable FP8 path"))
            except Exception as e:
                rows.append(row(shape, self.name, name, error=short(e)))
        return rows


class QDQ(Candidate):
    name = "qdq"
    api = "float32 attention on FP8 round-tripped Q/K/V (and P) — numerics only, no kernel"
    granularity = "tensor / fold / head / npu-block (Q 128, K/V 256 tokens)"

    def run(self, shape: Shape) -> list:
        rows = []
        for var in QDQ_VARIANTS:
            err = {kind: rel_l2(qdq_attention(*shape.acc[kind], shape.rows, *var), shape.ref[kind])
                   for kind in shape.kinds}
            rows.append(row(shape, self.name, qdq_name(*var), granularity=var[0], rotate=var[1], err=err))
        return rows


CLASSES = {c.name: c for c in (CudnnFE, CudnnBSA, TorchFA3, TorchAO, FA4, Sage1, TorchNative, QDQ)}


# ------------------------------------------------------------------------------------------------------- driver


def cpu_selftest() -> dict:
    """The quantizers, the rotation and the reference on a small CPU shape (what runs without a GPU)."""
    torch.manual_seed(0)
    out = {}
    for kind in KINDS:
        q, k, v = (x.float() for x in make_qkv(kind, 1, 2, 512, 0, "cpu"))
        rows = query_rows(512, 64, "cpu")
        ref = attention_rows(q, k, v, rows, 1 / math.sqrt(D))
        rot = attention_rows(rotate(q), rotate(k), v, rows, 1 / math.sqrt(D))
        out[kind] = {"rotation_exact": rel_l2(rot, ref)}
        for var in QDQ_VARIANTS:
            out[kind][qdq_name(*var)] = rel_l2(qdq_attention(q, k, v, rows, *var), ref)
    return out


def run_alt_cudnn(args, deadline: Deadline) -> dict | None:
    """If the frontend in use failed, retry cudnn_fe with the wheel under .whl-fp8/alt/ (unzipped, not installed)."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl-fp8", "alt", "nvidia_cudnn_frontend-*.whl")))
    if not wheels or deadline.left() < 60:
        return None
    target = tempfile.mkdtemp(prefix="cudnn_fe_alt_")
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(target)
    out = os.path.join(args.out, "alt")
    cmd = [sys.executable, os.path.abspath(__file__), "--out", out, "--only", "cudnn_fe", "--cudnn-path", target,
           "--budget-s", str(int(deadline.left() - 20)), "--reps", str(args.reps), "--ref-rows", str(args.ref_rows)]
    for flag in ("quick",):
        if getattr(args, flag):
            cmd.append("--" + flag)
    for opt in ("shapes", "device", "qkv"):
        if getattr(args, opt):
            cmd += ["--" + opt, str(getattr(args, opt))]
    log("retrying cudnn_fe with " + os.path.basename(wheels[-1]))
    try:
        subprocess.run(cmd, timeout=max(30, deadline.left() - 10), check=False)
        with open(os.path.join(out, "probe_fp8.json")) as f:
            got = json.load(f)
        got["wheel"] = os.path.basename(wheels[-1])
        return got
    except Exception as e:
        return {"error": short(e), "wheel": os.path.basename(wheels[-1])}


def table(result: dict, rows: list) -> str:
    """One line per row: ms, speed-ups over the bf16 baselines of the same shape, relative L2 errors per kind."""
    base = {(r["shape"], r["candidate"]): r for r in result["rows"] if r["candidate"].startswith("sdpa_")}
    kinds = [k for k in (*KINDS, "file") if any(k in r.get("err", {}) for r in rows)]
    lines = [(f"{'shape':14s} {'candidate':12s} {'variant':16s} {'kern ms':>8s} {'quant':>7s} {'post':>6s} "
              f"{'xcuDNN':>6s} {'xtotal':>6s} {'xdflt':>6s} ") + " ".join(f"{'e.' + k[:6]:>8s}" for k in kinds)]
    for r in rows:
        head = f"{r['shape']:14s} {r['candidate'][:12]:12s} {r['variant'][:16]:16s}"
        if r.get("error"):
            lines.append(f"{head} {r['error'][:110]}")
            continue
        bc, bd = base.get((r["shape"], "sdpa_cudnn"), {}), base.get((r["shape"], "sdpa_default"), {})
        k, qm, pm = r.get("kernel_ms"), r.get("quant_ms"), r.get("post_ms")
        total = None if k is None else k + (qm or 0) + (pm or 0)
        sx = lambda b, t: f"{b['kernel_ms'] / t:6.2f}" if t and b.get("kernel_ms") else "     -"  # noqa: E731
        f = lambda x, w, p: f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else " " * (w - 1) + "-"  # noqa: E731
        lines.append(f"{head} {f(k, 8, 3)} {f(qm, 7, 3)} {f(pm, 6, 3)} {sx(bc, k)} {sx(bc, total)} {sx(bd, k)} "
                     + " ".join(f(r["err"].get(kind), 8, 4) for kind in kinds))
    return "\n".join(lines)


def qdq_summary(result: dict) -> str:
    """The emulated errors, one line per shape and kind, for the schemes that matter."""
    keep = ("tensor", "tensor+had", "fold+had", "npu-block", "npu-block+had", "fold+had+o8", "fold+had+o8+vm")
    by = {}
    for r in result["rows"]:
        if r["candidate"] == "qdq" and not r.get("error"):
            for kind, e in r["err"].items():
                by.setdefault((r["shape"], kind), {})[r["variant"]] = e
    lines = ["qdq (float32 attention on FP8-rounded Q/K/V and P; relative L2): " + ", ".join(keep)]
    for (shape, kind), errs in by.items():
        lines.append(f"  {shape:14s} {kind:9s} " + " ".join(
            f"{errs[v]:.4f}" if isinstance(errs.get(v), float) else "-" for v in keep))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="3 shapes (4096/12 heads, 16384/40, 75600/40)")
    p.add_argument("--only", default="", help="comma-separated candidates: " + ",".join(CANDIDATES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--ref-rows", type=int, default=2048, help="query rows the float32 reference covers")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new work after this many seconds")
    p.add_argument("--shapes", default="", help="override, e.g. 1x40x16384,1x12x4096")
    p.add_argument("--cudnn-path", default="", help="directory put first on sys.path before importing cudnn")
    p.add_argument("--qkv", default="", help="torch.save'd {'q','k','v'}: bf16 (B, H, S, 128) activations captured "
                                            "from a model; measured first, as shape '(file)' with kind 'file'")
    p.add_argument("--cpu-selftest", action="store_true", help="without CUDA: run the quantizers on a CPU shape")
    p.add_argument("--device", default="cuda", help="'cpu' only to debug the driver on small --shapes (no kernels)")
    args = p.parse_args(argv)
    deadline = Deadline(args.budget_s)
    os.makedirs(args.out, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(CANDIDATES)
    unknown = [n for n in names if n not in CLASSES]
    if unknown:
        p.error(f"unknown candidates {unknown}; choose from {','.join(CANDIDATES)}")
    result = {"env": env(), "args": vars(args), "candidates": {}, "rows": [], "skipped": []}
    path = os.path.join(args.out, "probe_fp8.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)

    if not torch.cuda.is_available() and args.device != "cpu":
        result["error"] = "no CUDA device: nothing measured"
        if args.cpu_selftest:
            result["selftest"] = cpu_selftest()
            print(json.dumps(result["selftest"], indent=1))
        save()
        print(json.dumps(result["env"]))
        print(f"probe_fp8: no CUDA device; nothing measured (results in {path})")
        return 0

    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    cands = [CLASSES[n](args) for n in names]
    for c in cands:
        result["candidates"][c.name] = c.info
    dev = torch.device(args.device)
    TIMING["host_clock"] = dev.type == "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    work = [(b, h, s, None) for b, h, s in shapes]
    if args.qkv:
        try:
            got = torch.load(args.qkv, map_location=dev)
            qkv = tuple(got[n].to(device=dev, dtype=torch.bfloat16).contiguous() for n in ("q", "k", "v"))
            if qkv[0].dim() != 4 or qkv[0].shape[-1] != D or qkv[0].shape != qkv[1].shape:
                raise ValueError(f"expected (B, H, S, {D}) q/k/v of one shape, got {[tuple(x.shape) for x in qkv]}")
            work.insert(0, (*qkv[0].shape[:3], qkv))
        except Exception as e:
            result["skipped"].append({"shape": "file " + args.qkv, "why": short(e)})
    for b, h, s, qkv in work:
        est = 4.0 * b * h * s * s * D / 450e12 * (args.reps + 4) * 6 + 5  # ~6 timed kernels at >= 450 TFLOP/s
        if deadline.left() < est:
            result["skipped"].append({"shape": f"{b}x{h}x{s}", "why": f"time budget ({deadline.left():.0f} s left, "
                                                                      f"~{est:.0f} s needed)"})
            log(f"skip {b}x{h}x{s}: budget")
            continue
        log(f"shape {b}x{h}x{s}: inputs and float32 reference")
        try:
            shape = Shape(b, h, s, args, dev, qkv)
        except Exception as e:
            result["skipped"].append({"shape": f"{b}x{h}x{s}", "why": short(e)})
            continue
        log(f"shape {shape.name}: baselines")
        result["rows"] += baselines(shape)
        save()
        for c in cands:
            if deadline.left() < 15:
                result["skipped"].append({"shape": shape.name, "candidate": c.name, "why": "time budget"})
                continue
            if not c.ensure():
                continue
            log(f"shape {shape.name}: {c.name}")
            t0 = time.monotonic()
            try:
                result["rows"] += c.run(shape)
            except Exception as e:
                result["rows"].append(row(shape, c.name, "-", error=short(e)))
                c.info.setdefault("errors", []).append({"shape": shape.name,
                                                        "traceback": traceback.format_exc(limit=8)})
            c.info.setdefault("seconds", {})[shape.name] = round(time.monotonic() - t0, 1)
            save()
        del shape
        torch.cuda.empty_cache()
    fe = result["candidates"].get("cudnn_fe")
    if fe is not None and not args.cudnn_path and not any(
            r["candidate"] == "cudnn_fe" and not r.get("error") for r in result["rows"]):
        alt = run_alt_cudnn(args, deadline)
        if alt is not None:
            result["cudnn_fe_alt"] = {k: alt.get(k) for k in ("wheel", "error", "candidates")}
            for r in alt.get("rows", []):
                if r["candidate"] == "cudnn_fe":
                    result["rows"].append(dict(r, candidate="cudnn_fe@alt"))
    result["wall_s"] = round(args.budget_s - deadline.left(), 1)
    save()
    print(json.dumps(result["env"]))
    for name, info in result["candidates"].items():
        extra = {k: info[k] for k in ("mode", "head_descale", "fa3_available", "impls", "descale_types", "frontend",
                                      "backend") if k in info}
        print(f"{name:13s} available={info['available']} {info['error'] or ''} {json.dumps(extra) if extra else ''}"
              f" {'; '.join(info['notes'])}")
    for sk in result["skipped"]:
        print("skipped:", json.dumps(sk))
    with open(os.path.join(args.out, "probe_fp8.txt"), "w") as f:
        f.write(table(result, result["rows"]) + "\n\n" + qdq_summary(result) + "\n")
    print(qdq_summary(result))
    print(f"wall {result['wall_s']} s; x: bf16 SDPA kernel ms (cuDNN / default) over this kernel's ms, 'xtotal' over "
          "kernel+quant+post; e.<kind>: relative L2 vs float32 on the reference rows; all rows in probe_fp8.txt")
    print(table(result, [r for r in result["rows"] if r["candidate"] != "qdq"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
