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

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from attnfx.masks import allowed_of
from attnfx.patterns._static import dependencies
from attnfx.rewriter.graph import fake, op_name, sdpa_args
from attnfx.rewriter.report import SiteRecord
from attnfx.rewriter.site import Outcome, Site
from attnfx.runtime import steps

NAME = "npu_attention"


@dataclass
class NpuSite:
    layer: int
    fp8: bool
    skip_steps: frozenset[int]
    skip_layers: frozenset[int]
    record: SiteRecord
    analysable: bool = True  # the mask derives from graph inputs only: its analysis can be cached
    calls: list = field(default_factory=list)  # (step, quantized) of each call


_SITES: dict[int, NpuSite] = {}
_ids = itertools.count()


def _structure(rt: NpuSite, site: int, q, k, mask, key_tensors, key_ints):
    """The mask's structure, analysed once per distinct mask (the plan cache), if it has no empty rows."""
    from attnfx.masks import classify
    from attnfx.runtime.ops import PLANS

    batch = q.shape[0]
    analysis = PLANS.get_or_compute(("npu", site, tuple(q.shape), tuple(k.shape)), key_tensors, key_ints,
                                    lambda: classify(mask, batch, q.shape[1], q.shape[2], k.shape[2]))
    if analysis is None or analysis.empty_rows:
        return None
    return analysis.structure


@torch.library.custom_op("attnfx::npu_attention", mutates_args=())
def npu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  key_tensors: list[torch.Tensor], key_ints: list[int], site: int, scale: Optional[float],
                  is_causal: bool) -> torch.Tensor:
    from attnfx.backends import npu

    rt = _SITES[site]
    step = steps.current_step(rt.layer)
    quantize = rt.fp8 and step not in rt.skip_steps and rt.layer not in rt.skip_layers
    allowed = bias = structure = None
    if mask is not None and rt.analysable:
        structure = _structure(rt, site, q, k, mask, key_tensors, key_ints)
    if mask is not None:
        got = allowed_of(mask)
        if got is None:
            bias = mask if mask.dim() == 4 else mask.reshape(1, *([1] * (3 - mask.dim())), *mask.shape[-2:])
        else:
            allowed = got[0]
            while allowed.dim() < 4:
                allowed = allowed.unsqueeze(0)
    out, call = npu.attention(q, k, v, allowed=allowed, bias=bias, causal="top_left" if is_causal else None,
                              scale=scale, fp8=quantize, structure=structure)
    rt.calls.append((step, quantize))
    why = "FP8 (per-block, Hadamard-rotated Q/K)" if quantize else (
        "native precision: " + ("step skipped" if step in rt.skip_steps else "layer skipped"
                                if rt.layer in rt.skip_layers else "FP8 not requested"))
    rt.record.details["npu"] = {"op": call.op, "layout": call.layout, "sparse_mode": call.sparse_mode,
                                "quantized": quantize, "step": step, "layer": rt.layer, "why": why,
                                "mask": structure.describe() if structure is not None else None}
    return out.contiguous()


@npu_attention.register_fake
def _(q, k, v, mask, key_tensors, key_ints, site, scale, is_causal):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def rewrite(site: Site, ctx: Any) -> Outcome | None:
    opts = ctx.options
    if not (opts.npu or opts.npu_fp8) or op_name(site.node) != "sdpa":
        return None
    node = site.node
    args = sdpa_args(node)
    q = fake(args["query"])
    if q.dim() != 4:
        return Outcome.refuse("the NPU op takes 4-D (batch, heads, seq, dim) inputs here")
    if any(fake(args[n]).requires_grad for n in ("query", "key", "value")):
        return Outcome.refuse("gradients are recorded: the NPU fused infer attention is inference-only")
    if not (isinstance(args["dropout_p"], (int, float)) and args["dropout_p"] == 0):
        return Outcome.refuse(f"dropout_p={args['dropout_p']}")
    fp8, note = opts.npu_fp8, None
    d = q.shape[-1]
    if fp8 and (not isinstance(d, int) or d & (d - 1)):
        fp8, note = False, f"head_dim {d} is not a power of two: native precision (the FP8 rotation needs one)"
    layer = ctx.layer_index(site.record)
    tensors, ints, problem = ([], [], None) if args["attn_mask"] is None else dependencies(args["attn_mask"], node)
    sid = next(_ids)
    _SITES[sid] = NpuSite(layer, fp8, opts.skip_steps_set, opts.skip_layers_set, site.record, analysable=not problem)
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.call_function(torch.ops.attnfx.npu_attention.default,
                                  (args["query"], args["key"], args["value"], args["attn_mask"], tensors, ints, sid,
                                   args["scale"], bool(args["is_causal"])))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return Outcome(rewritten=True, target="attnfx::npu_attention", node=new,
                   output=new if site.output is node else None, reason=note,
                   details={"npu": {"layer": layer, "fp8_requested": fp8, "quantized": "decided per call"}})
