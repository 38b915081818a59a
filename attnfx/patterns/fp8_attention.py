"""fp8_attention — SDPA sites on CUDA run online FP8 attention (cuDNN's ``sdpa_fp8``), opt-in, with a measured bound.

What it matches
    With ``optimize(model, fp8=True)``: every SDPA call left after ``gqa`` and ``dead_tokens`` that runs on
    CUDA in inference, without dropout, without a mask (or with ``is_causal``), whose keys are as many as its
    queries (self-attention) and whose head_dim is a power of two. The call becomes, in the graph:
    Q·R and K·R (R the ±1 random-sign Hadamard matrix, a constant buffer of the graph), V − mean(V) over the
    tokens, one scale amax/448 per tensor and the casts to float8_e4m3fn — plain ops Inductor fuses with what
    produces Q, K and V —, then ``attnfx::fp8_attention`` (the kernel, or the native SDPA on calls that stay
    native), then the dequantization o8·scale_v + mean(V) back to the model's dtype.

Why the rewrite is exact (rotation, centring) or bounded (the FP8 rounding)
    The rotation is exact: (Q·R)(K·R)ᵀ = D·Q·Kᵀ, and the kernel is given scale/D. Centring V is exact: softmax
    rows sum to 1, so P·(V − m) + m = P·V. What changes is the FP8 rounding of Q·R, K·R, V − m, P and the
    output (per-tensor scales; the probe measured 0.4-0.7% relative L2 on activations with per-channel means,
    ~6% on i.i.d. Gaussian inputs). The error is not assumed: each site's first FP8 call (and the verification
    run with ``verify=True``) measures the relative L2 of its output against the native kernel on the same
    inputs; above ``fp8_max_error`` the site runs natively from then on. ``skip_steps`` / ``skip_layers`` keep
    chosen denoising steps and layers native; that choice is made per call by the op, which Inductor does not
    capture into CUDA graphs (tag ``cudagraph_unsafe``). The report gives each site's precision per call and why.

When it refuses (the site keeps the native kernel, and the report says why)
    Cross-attention (K/V of another length than Q, e.g. text K/V; a self-attention whose rows ``dead_tokens``
    narrowed is not, unless causal), an attention mask other than ``is_causal``, gradients recorded, dropout, a
    site not on CUDA, a dtype other than fp16/bf16/fp32, a head_dim that is not a power of two or above the
    kernel's 256, inputs that are not 4-D, a scale that is not a number. At run time (not refusals: the site's
    native path runs) a shape the kernel does not build (e.g. GQA, if refused), a kernel that fails, or a GPU
    older than Hopper.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource

from attnfx.backends import capabilities, cudnn_fp8
from attnfx.backends.hadamard import hadamard
from attnfx.fx.graph import emit, fake, fake_mode_of, known_eq
from attnfx.options import Options
from attnfx.patterns.base import Outcome, PassContext, Pattern, Refused, Site
from attnfx.runtime import ops

SCALES = "per tensor, amax/448: Q·R and K·R (R: random-sign Hadamard), V − mean(V)"


def _refuse(why: str) -> Refused:
    return Refused(why, fp8={"precision": "native", "why": why})


def rewrite(site: Site, ctx: PassContext) -> Outcome | None:
    opts = ctx.options
    node = site.node
    args = site.args()
    qn, kn, vn = args["query"], args["key"], args["value"]
    q, k, v = fake(qn), fake(kn), fake(vn)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        raise _refuse("the FP8 kernel takes 4-D (batch, heads, seq, dim) inputs here")
    if any(t.requires_grad for t in (q, k, v)):
        raise _refuse("gradients are recorded: FP8 attention is inference-only")
    if not (isinstance(args["dropout_p"], (int, float)) and args["dropout_p"] == 0):
        raise _refuse(f"dropout_p={args['dropout_p']}")
    if not known_eq(q.shape[2], k.shape[2]):
        if not _narrowed_self_attention(site, q.shape[2], k.shape[2]):
            raise _refuse(f"cross-attention ({k.shape[2]} keys for {q.shape[2]} queries): native precision")
        if args["is_causal"]:
            raise _refuse("dead_tokens left fewer queries than keys under is_causal: native precision")
    if args["attn_mask"] is not None:
        raise _refuse("an attention mask: the FP8 kernel takes none or is_causal only (the mask stays on the "
                      "native kernels)")
    d, dv = q.shape[-1], v.shape[-1]
    if not (isinstance(d, int) and isinstance(dv, int)) or d <= 0 or d & (d - 1):
        raise _refuse(f"head_dim {d} is not a power of two (the Hadamard rotation needs one)")
    why = capabilities.supports(cudnn_fp8.KERNEL, device=q.device.type, dtype=q.dtype, head_dim=max(d, dv))
    if why:
        raise _refuse(why)
    scale = args["scale"]
    if scale is not None and not isinstance(scale, (int, float)):
        raise _refuse(f"the scale is not a number ({scale})")
    hq, hkv = q.shape[1], k.shape[1]
    if known_eq(hq, hkv):
        n_rep = 1
    elif isinstance(hq, int) and isinstance(hkv, int) and hkv and hq % hkv == 0 and args["enable_gqa"]:
        n_rep = hq // hkv
    else:
        raise _refuse(f"{hq} query heads for {hkv} K/V heads")
    layer = ctx.layer_index(site.record)
    quantized = layer not in opts.skip_layers_set
    state = ops.Fp8Site(layer, opts.skip_steps_set, opts.skip_layers_set, opts.fp8_max_error, site.record, n_rep)
    sid = ops.register(state, ctx.keepalive)
    attn_scale = (float(scale) if scale is not None else 1.0 / math.sqrt(d)) / d  # (Q·R)(K·R)ᵀ = d·Q·Kᵀ
    causal, gqa = bool(args["is_causal"]), bool(args["enable_gqa"])
    g = ctx.gm.graph

    def call(fn, *a, **kw) -> fx.Node:
        return emit(g, "call_function", fn, a, kw, like=node)

    def items(t: fx.Node, n: int) -> list[fx.Node]:
        return [call(operator.getitem, t, i) for i in range(n)]

    with g.inserting_before(node):
        if quantized:
            rot = _constant(ctx.gm, d, q.dtype, q.device)
            q8, dq = items(call(cudnn_fp8.quantize, call(torch.matmul, qn, rot)), 2)
            k8, dk = items(call(cudnn_fp8.quantize, call(torch.matmul, kn, rot)), 2)
            vc, vm = items(call(cudnn_fp8.centre, vn), 2)
            v8, dvs, so = items(call(cudnn_fp8.quantize, vc), 3)
            res = call(torch.ops.attnfx.fp8_attention.default, qn, kn, vn, q8, k8, v8, dq, dk, dvs, so, vm, sid,
                       attn_scale, scale, causal, gqa)
            o8, native, use = items(res, 3)
            out = call(torch.where, use, call(cudnn_fp8.dequantize, o8, dvs, vm, n_rep, q.dtype), native)
        else:  # a skipped layer: the op only runs the native kernel (and counts the steps, if it is layer 0)
            res = call(torch.ops.attnfx.fp8_attention.default, qn, kn, vn, None, None, None, None, None, None, None,
                       None, sid, attn_scale, scale, causal, gqa)
            out = call(operator.getitem, res, 1)
    node.replace_all_uses_with(out)
    g.erase_node(node)
    detail = {"layer": layer, "kernel": cudnn_fp8.KERNEL, "scales": SCALES, "causal": causal, "n_rep": n_rep,
              "skip_steps": opts.skip_steps, "skip_layers": opts.skip_layers, "bound": opts.fp8_max_error,
              "precision": "decided per call" if quantized else "native (layer skipped)"}
    return Outcome(target="attnfx::fp8_attention", node=res, output=out, details={"fp8": detail},
                   reason=None if quantized else f"layer {layer} is in skip_layers: native precision on every call")


def _narrowed_self_attention(site: Site, q_len, kv_len) -> bool:
    """A self-attention whose query rows (or key columns) ``dead_tokens`` narrowed: as many queries as keys before."""
    dropped = site.record.details.get("dead_tokens") if "dead_tokens" in site.record.applied else None
    if not isinstance(dropped, dict) or not all(isinstance(x, int) for x in (q_len, kv_len)):
        return False
    return q_len + dropped.get("queries", 0) == kv_len + dropped.get("keys", 0)


def _constant(gm: fx.GraphModule, d: int, dtype: torch.dtype, device: torch.device) -> fx.Node:
    """The ±1 rotation as a buffer of the graph module, read with get_attr (a constant for Inductor)."""
    name = f"attnfx_hadamard_{d}_{str(dtype).replace('torch.', '')}_{device.type}{device.index or 0}"
    if not hasattr(gm, name):
        gm.register_buffer(name, hadamard(d, str(device), dtype, normalized=False).clone(), persistent=False)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None and name not in sources:  # AOTAutograd wants a source for every buffer of a Dynamo graph
        gm._param_name_to_source = {**sources, name: ConstantSource(name)}
    node = gm.graph.get_attr(name)
    mode = fake_mode_of(gm.graph)
    value = getattr(gm, name)
    node.meta["example_value"] = mode.from_tensor(value, static_shapes=True) if mode is not None else value
    return node


def _requested(options: Options) -> bool:
    return options.fp8


PATTERN = Pattern("fp8_attention", rewrite, applies_to="sdpa", after=("gqa", "dead_tokens"),
                  before=("mask_structure",), enabled=_requested)
