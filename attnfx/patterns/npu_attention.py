"""npu_attention — SDPA sites run on Ascend's fused infer attention, natively or with online FP8 (opt-in).

What it matches
    With ``optimize(model, npu=True)`` (or ``npu_fp8=True``): every SDPA call left after ``gqa`` and
    ``dead_tokens``, in inference (no gradients), without dropout. It becomes ``attnfx::npu_attention``.

Why the rewrite is exact (native) / bounded (FP8)
    The op computes softmax(scale·q kᵀ + mask) v with GQA by head groups, as SDPA does; attnfx passes
    SDPA's scale explicitly (the op's default is 1.0), the mask in the op's polarity (True = masked), a
    causal flag as sparse mode 2 (top-left, SDPA's is_causal), and an additive bias as ``pse_shift``.
    FP8: the Hadamard rotation is orthogonal (Q·Kᵀ unchanged); the only change is per-block FP8 rounding
    of Q, K and V, which ``skip_steps`` / ``skip_layers`` keep away from the steps and layers that need
    native precision.

When it refuses
    Gradients are recorded (the op is inference-only), dropout_p > 0, inputs that are not 4-D BNSD, FP8
    with a head_dim that is not a power of two (the rotation needs one; the native path is used).
"""

from __future__ import annotations

import torch

from attnfx.fx.graph import fake, replace_call
from attnfx.fx.static import dependencies
from attnfx.options import Options
from attnfx.patterns.base import Outcome, PassContext, Pattern, Refused, Site
from attnfx.runtime import ops


def rewrite(site: Site, ctx: PassContext) -> Outcome | None:
    opts = ctx.options
    node = site.node
    args = site.args()
    q = fake(args["query"])
    if q.dim() != 4:
        raise Refused("the NPU op takes 4-D (batch, heads, seq, dim) inputs here")
    if any(fake(args[n]).requires_grad for n in ("query", "key", "value")):
        raise Refused("gradients are recorded: the NPU fused infer attention is inference-only")
    if not (isinstance(args["dropout_p"], (int, float)) and args["dropout_p"] == 0):
        raise Refused(f"dropout_p={args['dropout_p']}")
    fp8, note = opts.npu_fp8, None
    d = q.shape[-1]
    if fp8 and (not isinstance(d, int) or d & (d - 1)):
        fp8, note = False, f"head_dim {d} is not a power of two: native precision (the FP8 rotation needs one)"
    layer = ctx.layer_index(site.record)
    tensors, ints, problem = ([], [], None) if args["attn_mask"] is None else dependencies(args["attn_mask"], node)
    sid = ops.register(ops.NpuSite(layer, fp8, opts.skip_steps_set, opts.skip_layers_set, site.record,
                                   analysable=not problem), ctx.keepalive)
    new = replace_call(node, torch.ops.attnfx.npu_attention.default,
                       (args["query"], args["key"], args["value"], args["attn_mask"], tensors, ints, sid,
                        args["scale"], bool(args["is_causal"])))
    return Outcome(target="attnfx::npu_attention", node=new, output=new if site.output is node else None, reason=note,
                   details={"npu": {"layer": layer, "fp8_requested": fp8, "quantized": "decided per call"}})


def _requested(options: Options) -> bool:
    return options.npu or options.npu_fp8


PATTERN = Pattern("npu_attention", rewrite, applies_to="sdpa", after=("gqa", "dead_tokens"), enabled=_requested)
