"""mask_structure — a masked SDPA whose mask has structure runs that structure on unmasked/varlen kernels.

What it matches
    An SDPA call with an ``attn_mask`` (bool, or float holding only 0 and -inf / finfo.min) and no
    dropout. Where the mask comes from decides how it is read:
      * static — the mask is computed in the graph from constants and static shapes only
        (``arange``/comparisons/``tril``/``ones``/slicing...): it is evaluated once at compile time,
        classified (``attnfx.masks.classify``) and the plan is baked into the graph as plain torch ops;
      * runtime — the mask is, or is computed from, graph inputs (tensors, parameters/buffers, symbolic
        sizes): the call becomes ``attnfx::structured_attention``, which classifies each distinct mask
        once and caches the plan keyed on those inputs (see ``attnfx/runtime``).
    A mask computed from random ops is refused.

Why the rewrite is exact
    A structure is accepted only if materializing it reproduces the mask bit for bit (``torch.equal``).
    Its segments partition the (query row, allowed key) pairs: each segment is a query-row slice
    attending a contiguous key range, entirely or causally, so the unmasked (or causal) kernel on that
    slice computes exactly the masked softmax of those rows — keys outside the range had weight 0. Rows
    with no allowed key get what the original kernel gives there (capability table ``no_key_rows``:
    0, NaN, or the mean of v); when that is not reproducible the dense mask is kept.

When it refuses (the masked SDPA stays)
    dropout_p > 0; a float mask with other values (an additive bias, e.g. ALiBi); a mask computed from
    random ops; a mask without usable structure, or one whose no-key rows the original kernel fills
    with values no other kernel gives (cuDNN with a bool mask).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from attnfx.backends import capabilities, execute
from attnfx.backends import sdpa as sdpa_backend
from attnfx.masks import Analysis, classify
from attnfx.patterns._static import dependencies, evaluate
from attnfx.rewriter.graph import fake, op_name, sdpa_args
from attnfx.rewriter.site import Outcome, Site
from attnfx.runtime import ops

NAME = "mask_structure"



class StaticPlan:
    """A mask structure fixed at compile time, called in the graph in place of SDPA (plain torch ops)."""

    def __init__(self, analysis: Analysis, kernel: str, fill: str | None):
        self.analysis, self.kernel, self.fill = analysis, kernel, fill
        self.__name__ = f"attnfx_{analysis.structure.kind}_attention"
        self.__qualname__ = self.__name__

    def __call__(self, q, k, v, scale=None, enable_gqa=False):
        return execute.run(self.analysis.structure, self.kernel, q, k, v, scale=scale, enable_gqa=enable_gqa,
                           fill=self.fill or "zero")

    def __repr__(self) -> str:
        return f"StaticPlan({self.analysis.structure.kind}, {self.kernel})"


def _original_kernel(args: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    q, k, v, m = (fake(args[n]) for n in ("query", "key", "value", "attn_mask"))
    inputs = sdpa_backend.SdpaInputs.from_fakes(q, k, v, m, 0.0, False, args["scale"])
    kernel = sdpa_backend.predict_kernel(inputs, enable_gqa=bool(args["enable_gqa"]))
    rows = capabilities.kernel(kernel).no_key_rows if kernel else {}
    return kernel, dict(rows)


def rewrite(site: Site, ctx: Any) -> Outcome | None:
    node = site.node
    if op_name(node) != "sdpa":
        return None
    args = sdpa_args(node)
    mask = args["attn_mask"]
    if mask is None or not isinstance(mask, fx.Node):
        return None
    if not (isinstance(args["dropout_p"], (int, float)) and args["dropout_p"] == 0):
        return Outcome.refuse(f"dropout_p={args['dropout_p']}")
    m = fake(mask)
    if not (m.dtype == torch.bool or m.dtype.is_floating_point):
        return Outcome.refuse(f"mask dtype {m.dtype}")
    tensors, ints, problem = dependencies(mask, node)
    if problem:
        return Outcome.refuse(problem)
    original, no_key_rows = _original_kernel(args)
    q, k = fake(args["query"]), fake(args["key"])
    forced = ctx.options.kernel
    call_args = (args["query"], args["key"], args["value"])

    if not tensors and not ints and forced != "flex" and not ctx.options.autotune:
        batch = q.shape[0] if q.dim() == 4 else 1
        analysis = classify(evaluate(mask, node), batch, q.shape[-3], q.shape[-2], k.shape[-2])
        plan = ops.decide(analysis, no_key_rows, batch, q.shape[-2], k.shape[-2], q.device, q.dtype, q.shape[-1],
                          forced)
        if plan.kernel is None:
            return Outcome.refuse(plan.why, **({"mask": _mask_detail(analysis, "static")} if analysis else {}))
        target: Any = StaticPlan(analysis, plan.kernel, plan.fill)
        new_args, new_kwargs = call_args, {"scale": args["scale"], "enable_gqa": bool(args["enable_gqa"])}
        detail = {**_mask_detail(analysis, "static"), "kernel": plan.kernel, "why": plan.why}
    else:
        record = site.record
        namespace = (ctx.uid, mask.name)  # every site using this mask node shares its plans

        def on_plan(plan, record=record):
            record.details["mask"] = {"analysis": "runtime", **ops.describe(plan)}

        sid = ops.register(ops.SiteRuntime(namespace, no_key_rows, forced_kernel=forced, on_plan=on_plan,
                                           autotune=ctx.options.autotune))
        target = torch.ops.attnfx.structured_attention.default
        new_args = (*call_args, mask, tensors, ints, sid, args["scale"], bool(args["enable_gqa"]))
        new_kwargs = {}
        detail = {"analysis": "runtime", "kind": "decided at the first call"}

    graph = node.graph
    with graph.inserting_before(node):
        new = graph.call_function(target, new_args, new_kwargs)
    new.meta.update({k: v for k, v in node.meta.items()})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    name = "attnfx::structured_attention" if detail["analysis"] == "runtime" else target.__name__
    return Outcome(rewritten=True, target=name, node=new, output=new if site.output is node else None,
                   details={"mask": detail, "original_kernel": original or "unknown"}, replaced=[mask])


def _mask_detail(analysis: Analysis, how: str) -> dict[str, Any]:
    return {"analysis": how, **analysis.describe()}
