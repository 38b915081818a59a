"""A CPU emulator of the cuDNN frontend's FP8 attention (``pygraph.sdpa_fp8``), following its contract, for tests.

Installed as ``sys.modules["cudnn"]``. It implements the part of the frontend attnfx uses — ``pygraph`` with
``tensor``, ``sdpa_fp8``, the output setters, validate / build / plans / workspace, ``execute`` — and checks
what the real one checks as measured on an H200 (cuDNN 9.19, frontend 1.32): FP8 Q/K/V, per-tensor float32
descale tensors of shape (1, 1, 1, 1) (per-head descales are refused), an FP8 output (a bf16/fp16 output is
refused on Hopper, ``ARCH``), bound buffers matching the declared dims, strides and dtypes. ``execute`` computes

    S = (Q·dq)(K·dk)ᵀ · attn_scale (+ causal top-left),  P = exp(S − rowmax),  l = rowsum(P),
    O = (round8(P·scale_s)·descale_s) (V·dv) / l,  o8 = round8(O·scale_o)

in float32 (K/V heads shared by groups of query heads), records every build and call in ``CALLS`` / ``BUILDS``,
and counts output values beyond E4M3's range (``saturated``: a wrong scale_o would show there).
"""

from __future__ import annotations

import importlib.machinery
import types

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
CALLS: list[dict] = []
BUILDS: list[dict] = []


class cudnnGraphNotSupportedError(RuntimeError):  # noqa: N801 — the frontend's name
    pass


class data_type:  # noqa: N801
    FP8_E4M3, FLOAT, BFLOAT16, HALF, INT32 = "FP8_E4M3", "FLOAT", "BFLOAT16", "HALF", "INT32"


class heur_mode:  # noqa: N801
    A, FALLBACK = "A", "FALLBACK"


_TORCH = {data_type.FP8_E4M3: FP8, data_type.FLOAT: torch.float32, data_type.BFLOAT16: torch.bfloat16,
          data_type.HALF: torch.float16, data_type.INT32: torch.int32}


class Options:
    """What the emulated library accepts (tests change these)."""

    arch = (9, 0)  # Hopper: FP8 output only
    gqa = True  # K/V with fewer heads than Q
    unpadded_multiple = 1  # lengths the unpadded graph takes (e.g. 128: others need the padded graph)


OPTIONS = Options()


class Tensor:
    def __init__(self, name, dim=None, stride=None, data_type=None):
        self.name, self.dim, self.stride, self.data_type, self.output = name, dim, stride, data_type, False

    def set_output(self, flag):
        self.output = flag
        return self

    def set_dim(self, dim):
        self.dim = list(dim)
        return self

    def set_stride(self, stride):
        self.stride = list(stride)
        return self

    def set_data_type(self, dt):
        self.data_type = dt
        return self

    def get_dim(self):
        return self.dim


class pygraph:  # noqa: N801
    def __init__(self, name="graph", io_data_type=None, intermediate_data_type=None, compute_data_type=None,
                 handle=None, **kw):
        self.io, self.intermediate, self.compute = io_data_type, intermediate_data_type, compute_data_type
        self.tensors: list[Tensor] = []
        self.op: dict | None = None
        self.built = False

    def tensor(self, name="", dim=None, stride=None, data_type=None, **kw):
        t = Tensor(name, list(dim), list(stride), data_type)
        self.tensors.append(t)
        return t

    def sdpa_fp8(self, q, k, v, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, is_inference=None,
                 attn_scale=None, bias=None, use_alibi_mask=False, use_padding_mask=False, seq_len_q=None,
                 seq_len_kv=None, use_causal_mask=False, use_causal_mask_bottom_right=False, generate_stats=None,
                 **rest):
        if (generate_stats is None) == (is_inference is None):
            raise RuntimeError("Exactly one of {generate_stats, is_inference} must be set (prefer generate_stats).")
        unsupported = {k_: v_ for k_, v_ in rest.items() if v_ not in (None, False)}
        assert not unsupported, f"emulator: sdpa_fp8 arguments not emulated: {sorted(unsupported)}"
        outs = [Tensor("o"), Tensor("stats"), Tensor("amax_s"), Tensor("amax_o")]
        self.op = dict(q=q, k=k, v=v, descale_q=descale_q, descale_k=descale_k, descale_v=descale_v,
                       descale_s=descale_s, scale_s=scale_s, scale_o=scale_o, attn_scale=attn_scale,
                       padding=use_padding_mask, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv, causal=use_causal_mask,
                       generate_stats=bool(generate_stats), bias=bias, o=outs[0], amax_s=outs[2], amax_o=outs[3])
        return outs

    def validate(self):
        op = self.op
        if op is None:
            raise RuntimeError("emulator: no operation in the graph")
        if self.io != data_type.FP8_E4M3 or self.compute != data_type.FLOAT:
            raise cudnnGraphNotSupportedError(f"io {self.io} / compute {self.compute}: FP8 SDPA wants FP8_E4M3/FLOAT")
        for n in ("q", "k", "v"):
            t = op[n]
            if t.data_type != data_type.FP8_E4M3 or len(t.dim) != 4 or t.stride[-1] != 1:
                raise cudnnGraphNotSupportedError(f"{n}: FP8 (B, H, S, D) with unit last stride expected")
        for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            t = op[n]
            if t.data_type != data_type.FLOAT:
                raise cudnnGraphNotSupportedError(f"{n} must be FLOAT")
            if list(t.dim) != [1, 1, 1, 1]:
                raise cudnnGraphNotSupportedError(f"{n} {t.dim}: only per-tensor (1, 1, 1, 1) scales on Hopper")
        if op["attn_scale"] is None:
            raise cudnnGraphNotSupportedError("attn_scale not set")
        b, hq, sq, d = op["q"].dim
        bk, hk, sk, dk = op["k"].dim
        if (bk, dk) != (b, d) or op["v"].dim[:3] != [b, hk, sk] or hq % hk:
            raise cudnnGraphNotSupportedError(f"q {op['q'].dim} k {op['k'].dim} v {op['v'].dim}: shapes do not match")
        if hk != hq and not OPTIONS.gqa:
            raise cudnnGraphNotSupportedError(f"{hq} query heads for {hk} K/V heads: not supported here")
        if not op["padding"] and (sq % OPTIONS.unpadded_multiple or sk % OPTIONS.unpadded_multiple):
            raise cudnnGraphNotSupportedError(f"s_q {sq} / s_kv {sk}: not a multiple of {OPTIONS.unpadded_multiple}")
        o = op["o"]
        if not o.output or o.dim != [b, hq, sq, op["v"].dim[3]]:
            raise cudnnGraphNotSupportedError(f"O must be an output of shape {[b, hq, sq, op['v'].dim[3]]}")
        if o.data_type != data_type.FP8_E4M3 and OPTIONS.arch < (10, 0):
            raise cudnnGraphNotSupportedError(f"O in {o.data_type}: only FP8 outputs on sm{OPTIONS.arch[0]}0")

    def build_operation_graph(self):
        pass

    def create_execution_plans(self, modes):
        assert list(modes) == [heur_mode.A, heur_mode.FALLBACK], modes

    def check_support(self):
        pass

    def build_plans(self):
        self.built = True
        op = self.op
        BUILDS.append({"q": op["q"].dim, "k": op["k"].dim, "v": op["v"].dim, "causal": op["causal"],
                       "padding": op["padding"], "attn_scale": op["attn_scale"]})

    def get_workspace_size(self):
        return 1024

    def execute(self, pack, workspace, handle=None):
        assert self.built, "execute before build_plans"
        op = self.op
        bound = {}
        for t in self.tensors + [op["o"], op["amax_s"], op["amax_o"]]:
            if t.name in ("seq_q", "seq_kv") and not op["padding"]:
                continue
            if t not in pack:
                raise ValueError(f"the variant pack is missing a buffer for tensor {t.name!r}")
            x = pack[t]
            assert isinstance(x, torch.Tensor), f"{t.name}: bound to {type(x).__name__}"
            assert x.dtype == _TORCH[t.data_type], f"{t.name}: {x.dtype} bound to a {t.data_type} tensor"
            assert list(x.shape) == list(t.dim), f"{t.name}: shape {list(x.shape)} != declared {t.dim}"
            assert list(x.stride()) == list(t.stride) or x.numel() == 1, \
                f"{t.name}: stride {list(x.stride())} != declared {t.stride} (the kernel reads by the declaration)"
            bound[t.name] = x
        for n in ("q", "k", "v", "descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            bound[n] = pack[op[n]]
        o8, amax_s, amax_o, saturated = _compute(bound, op, pack)
        pack[op["o"]].copy_(o8)
        pack[op["amax_s"]].fill_(amax_s)
        pack[op["amax_o"]].fill_(amax_o)
        CALLS.append({"q": bound["q"], "k": bound["k"], "v": bound["v"],
                      **{n: float(bound[n]) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s",
                                                      "scale_o")},
                      "attn_scale": op["attn_scale"], "causal": op["causal"], "padding": op["padding"],
                      "o": pack[op["o"]].clone(), "saturated": saturated,
                      "workspace": workspace.numel() if isinstance(workspace, torch.Tensor) else workspace})


def _compute(b, op, pack):
    q = b["q"].float() * b["descale_q"].reshape(())
    k = b["k"].float() * b["descale_k"].reshape(())
    v = b["v"].float() * b["descale_v"].reshape(())
    hq, hk = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    s = (q @ k.transpose(-1, -2)) * op["attn_scale"]
    sq, sk = s.shape[-2], s.shape[-1]
    masked = torch.zeros(sq, sk, dtype=torch.bool)
    if op["causal"]:
        masked |= torch.ones(sq, sk, dtype=torch.bool).triu(1)
    s = s.masked_fill(masked, float("-inf"))
    if op["padding"]:
        lq = pack[op["seq_len_q"]].reshape(-1)
        lk = pack[op["seq_len_kv"]].reshape(-1)
        for i in range(s.shape[0]):
            s[i, :, :, int(lk[i]):] = float("-inf")
            s[i, :, int(lq[i]):, :] = 0.0  # rows past the length: any finite value (cropped by the caller)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    total = p.sum(-1, keepdim=True)
    pq = (p * b["scale_s"].reshape(())).to(FP8).float() * b["descale_s"].reshape(())
    o = (pq @ v) / total
    scaled = o * b["scale_o"].reshape(())
    saturated = int((scaled.abs() > FP8_MAX * (1 + 2 ** -4)).sum())
    return scaled.to(FP8), float(p.amax()), float(o.abs().amax()), saturated


def create_handle():
    return object()


def set_stream(handle, stream):
    pass


def backend_version():
    return 91900


def module() -> types.ModuleType:
    mod = types.ModuleType("cudnn")
    mod.__spec__ = importlib.machinery.ModuleSpec("cudnn", None)
    for name in ("pygraph", "data_type", "heur_mode", "cudnnGraphNotSupportedError", "create_handle", "set_stream",
                 "backend_version"):
        setattr(mod, name, globals()[name])
    mod.__version__ = "emulator"
    return mod
