"""mask_structure — a masked SDPA whose mask has structure runs that structure on unmasked/varlen kernels.

What it matches
    An SDPA call with an ``attn_mask`` (bool, or float holding only 0 and -inf / finfo.min) and no
    dropout. Where the mask comes from decides how it is read:
      * static — the mask is computed in the graph from constants and static shapes only
        (``arange``/comparisons/``tril``/``ones``/slicing...): it is evaluated once at compile time,
        classified (``attnfx.masks.classify``) and the plan is baked into the graph as plain torch ops;
      * specialized — the mask is, or is computed cheaply from, graph tensor inputs and the shapes are
        static: it is read from the example call at compile time and the plan is baked in as for a static
        mask, behind a guard (``attnfx.runtime.guards``): each call checks, once per distinct mask tensor
        (cached), that its mask equals that one (a copy is held: masks up to 256 MiB), and otherwise runs
        the graph compiled with the run-time op below (option ``specialize=False`` goes there directly);
      * runtime — otherwise (symbolic sizes, masks computed with heavy ops, the general graph): the call
        becomes ``attnfx::structured_attention``, which classifies each distinct mask once and caches the
        plan keyed on those inputs (see ``attnfx/runtime``).
    A mask computed from random ops is refused.

Why the rewrite is exact
    A structure is accepted only if materializing it reproduces the mask bit for bit (``torch.equal``).
    Its segments partition the (query row, allowed key) pairs: each segment is a query-row slice
    attending a contiguous key range, entirely, causally, or within a causal sliding window (the
    ``window`` keys ending at each row's diagonal), so the unmasked (causal, windowed) kernel on that
    slice computes exactly the masked softmax of those rows — keys outside the range had weight 0. A
    windowed segment split into blocks of rows keeps each row's diagonal and window, so each block over
    its key band with that band as mask computes the same rows; FlashAttention's ``window_size=(w - 1,
    0)`` is the same window (its window counts the keys before the diagonal). Rows with no allowed key
    get what the original kernel gives there (capability table ``no_key_rows``: 0, NaN, or the mean of
    v); when that is not reproducible the dense mask is kept.

When it refuses (the masked SDPA stays)
    dropout_p > 0; a float mask with other values (an additive bias, e.g. ALiBi); a mask computed from
    random ops; a mask without usable structure, or one whose no-key rows the original kernel fills
    with values no other kernel gives (cuDNN with a bool mask); a sliding window where no windowed
    varlen kernel runs and band blocks would compute most of the dense scores anyway, or that falls
    into too many pieces (right padding with a wide window). By numbers (``attnfx.backends.cost``): a mask
    not known when compiling, over at most 16 query rows (decoding: K/V are read once either way, and each
    new mask would cost a host sync to read); a structure whose kernels are estimated no faster than the
    dense masked kernel (launches, FLOPs, bytes at the device's rates); a run-time site whose masks are new on
    every call stops reading them after a few calls. Under CUDA graphs (``mode="reduce-overhead"``), a plan
    decided per call in Python would be frozen into the replay: only masks known when compiling, or passed in
    and specialized on behind a guard checked outside the graph, are rewritten.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from attnfx.backends import capabilities, cost, execute
from attnfx.backends import sdpa as sdpa_backend
from attnfx.masks import Analysis, classify
from attnfx.fx.graph import fake, replace_call
from attnfx.fx.static import cheap, dependencies, evaluate, input_names, runtime_value
from attnfx.patterns.base import Outcome, PassContext, Pattern, Refused, Site
from attnfx.runtime import ops
from attnfx.runtime.guards import Guard
from attnfx.runtime.guards import add as add_guard
MAX_HELD_MASK_BYTES = 256 << 20  # masks passed in up to this size are specialized on (a copy is held)



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


def rewrite(site: Site, ctx: PassContext) -> Outcome | None:
    node = site.node
    args = site.args()
    mask = args["attn_mask"]
    if mask is None or not isinstance(mask, fx.Node):
        return None
    if not (isinstance(args["dropout_p"], (int, float)) and args["dropout_p"] == 0):
        raise Refused(f"dropout_p={args['dropout_p']}")
    m = fake(mask)
    if not (m.dtype == torch.bool or m.dtype.is_floating_point):
        raise Refused(f"mask dtype {m.dtype}")
    tensors, ints, problem = dependencies(mask, node)
    if problem:
        raise Refused(problem)
    original, no_key_rows = _original_kernel(args)
    q, k = fake(args["query"]), fake(args["key"])
    forced = ctx.options.kernel
    call_args = (args["query"], args["key"], args["value"])

    static = not tensors and not ints  # computed from constants: read once, at compile time, at no run-time cost
    q_len = q.shape[-2]
    if not static and forced is None and cost.small_query(q.device.type, q_len):
        raise Refused(f"cost model: {q_len} query row(s) (<= {cost.SMALL_QUERY}): the dense masked kernel reads K/V "
                      "once and a structure saves nothing, while reading a mask passed in costs a host sync per new "
                      "mask; the dense mask is kept, unread")

    value, guard, plan = None, None, None  # guard: the mask is passed in and the plan is specialized on it
    if forced != "flex" and not ctx.options.autotune:
        if static:
            value = evaluate(mask, node)
        elif not ints and all(isinstance(d, int) for d in (*q.shape, *k.shape)):
            value, guard = _specialize(mask, node, ctx)
    if value is not None:
        batch = q.shape[0] if q.dim() == 4 else 1
        analysis = classify(value, batch, q.shape[-3], q.shape[-2], k.shape[-2])
        plan = ops.decide(analysis, no_key_rows, batch, q.shape[-2], k.shape[-2], q.device, q.dtype, q.shape[-1],
                          forced, heads=q.shape[-3])
        if plan.kernel is None:
            if guard is None:
                if analysis is None:
                    raise Refused(plan.why)
                raise Refused(plan.why, mask={**_mask_detail(analysis, "static"),
                                              **({"cost": plan.cost} if plan.cost else {})})
            plan = None  # nothing better for this mask passed in: the run-time op decides per mask
    if plan is not None:
        if guard is not None:
            add_guard(ctx.guards, guard, site.record)
        target: Any = StaticPlan(analysis, plan.kernel, plan.fill)
        new_args, new_kwargs = call_args, {"scale": args["scale"], "enable_gqa": bool(args["enable_gqa"])}
        detail = {**_mask_detail(analysis, "static" if guard is None else "specialized"), "kernel": plan.kernel,
                  "why": plan.why, **({"cost": plan.cost} if plan.cost else {})}
    elif ctx.options.cuda_graphs:
        raise Refused(f"mode={ctx.options.mode or 'default'} with CUDA graphs: a plan decided per call in Python "
                      "would be frozen into the replay; the dense mask is kept for masks not known when compiling")
    else:
        record = site.record
        namespace = (ctx.uid, mask.name)  # every site using this mask node shares its plans

        def on_plan(plan, record=record):
            record.details["mask"] = {"analysis": "runtime", **ops.describe(plan)}

        sid = ops.register(ops.SiteRuntime(namespace, no_key_rows, forced_kernel=forced, on_plan=on_plan,
                                           autotune=ctx.options.autotune), ctx.keepalive)
        target = torch.ops.attnfx.structured_attention.default
        new_args = (*call_args, mask, tensors, ints, sid, args["scale"], bool(args["enable_gqa"]))
        new_kwargs = {}
        detail = {"analysis": "runtime", "kind": "decided at the first call"}

    new = replace_call(node, target, new_args, new_kwargs)
    name = "attnfx::structured_attention" if detail["analysis"] == "runtime" else target.__name__
    return Outcome(target=name, node=new, output=new if site.output is node else None,
                   details={"mask": detail, "original_kernel": original or "unknown"}, replaced=[mask])


def _specialize(mask: fx.Node, node: fx.Node, ctx: PassContext) -> tuple[torch.Tensor | None, Guard | None]:
    """A mask passed in (or computed cheaply from inputs): its value at the example call, and the guard that
    keeps the plan built from it exact — the mask equal to that value, checked once per distinct tensor."""
    if not ctx.specialize:
        return None, None
    found = runtime_value(mask, node, ctx.example_inputs)
    if found is None or not cheap(found[1]):
        return None, None
    value, prefix, inputs = found
    if value.numel() * value.element_size() > MAX_HELD_MASK_BYTES:
        return None, None  # the check compares with a copy of the example mask: not for huge masks
    example = value.clone()

    def holds(v: torch.Tensor) -> bool:
        return (v.shape, v.dtype, v.device) == (example.shape, example.dtype, example.device) and torch.equal(v, example)

    return value, Guard(f"the mask computed from {input_names(prefix)}", prefix, inputs, holds,
                        "equal to the mask the graph was specialized on", key=("mask", mask.name))


def _mask_detail(analysis: Analysis, how: str) -> dict[str, Any]:
    return {"analysis": how, **analysis.describe()}


PATTERN = Pattern("mask_structure", rewrite, applies_to="sdpa", after=("gqa", "dead_tokens", "npu_attention"))
