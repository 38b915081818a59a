"""The custom ops rewritten graphs call, and the per-site state they reach by an int id.

``attnfx::structured_attention``: masked SDPA whose mask is only known at run time. The op is opaque to Inductor (a ``torch.library`` custom op with a fake impl; its backward is a custom op
too). At run time it looks the mask's plan up in the input cache — keyed on the *graph inputs* the mask is
computed from, so a hit costs no device read and no host sync — and on a miss classifies the mask once
(``attnfx.masks.classify``), verifies the structure by materializing it, chooses the kernel, and stores
the plan. Every layer that uses the same mask shares that plan. A mask without structure (or whose rows
with no allowed key cannot be reproduced) runs the original dense masked SDPA.

``attnfx::npu_attention``: SDPA on Ascend's fused infer attention (``attnfx.backends.npu``), natively or with
online FP8, the mask analysed once per distinct mask.

Per-site state lives in :data:`SITES`, which holds it weakly: the compiled graph keeps it alive (the
``keepalive`` list the backend attaches to what it returns), so it goes when the graph goes.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from attnfx.backends import execute, flex, npu
from attnfx.fx.sites import SiteRecord
from attnfx.masks import Analysis, allowed_of, classify
from attnfx.runtime import steps
from attnfx.runtime.cache import InputCache

log = logging.getLogger("attnfx")

PLANS = InputCache(max_entries=256)


@dataclass
class Plan:
    analysis: Analysis | None
    kernel: str | None  # None: the dense masked SDPA
    fill: str | None
    why: str
    block_mask: Any = None  # for the flex kernel: derived from the mask once


@dataclass
class SiteRuntime:
    """What the op needs to know about one rewritten site."""

    namespace: tuple  # identifies the mask expression: sites sharing a mask node share plans
    no_key_rows: dict[str, str]  # what the original kernel gives on rows with no allowed key, per spelling
    forced_kernel: str | None = None
    autotune: bool = False
    on_plan: Callable[[Plan], None] | None = None  # reports each new plan
    reported: tuple | None = None  # (plan, its kernel and why) last reported; the plan held, not an id()
    last: tuple | None = None  # (signature, plan) of the previous call: the common case, checked first


class _Registry:
    """Site id -> run-time state, held weakly (the compiled graph holds it through its keepalive list)."""

    def __init__(self):
        self._states: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def register(self, state: Any, keepalive: list) -> int:
        with self._lock:
            sid = next(self._ids)
            self._states[sid] = state
        keepalive.append(state)
        return sid

    def __getitem__(self, sid: int) -> Any:
        return self._states[sid]

    def __len__(self) -> int:
        return len(self._states)

    def values(self) -> list:
        return list(self._states.values())


SITES = _Registry()


def register(state: Any, keepalive: list) -> int:
    """Register a site's run-time state; it lives as long as ``keepalive`` (the compiled graph's list)."""
    return SITES.register(state, keepalive)


def decide(analysis: Analysis | None, no_key_rows: dict[str, str], batch: int, q_len: int, kv_len: int, device,
           dtype: torch.dtype, head_dim: int, forced: str | None) -> Plan:
    """The plan for a classified mask — its kernel (None: the dense masked SDPA) and what its rows with no
    allowed key get. Shared by the compile-time (static) and the run-time analysis."""
    if analysis is None:
        return Plan(None, None, None, "the mask holds values other than 0 and -inf/finfo.min: an additive bias")
    fill = None
    if analysis.empty_rows:
        fill = no_key_rows.get(analysis.spelling, "unknown")
        if fill not in execute.FILLS:
            return Plan(analysis, None, None, f"{analysis.empty_rows} row(s) have no allowed key and the original "
                                              f"kernel gives '{fill}' there: kept dense to match it")
    kernel, why = execute.choose_kernel(analysis.structure, batch, q_len, kv_len, device, dtype, head_dim, forced)
    return Plan(analysis, kernel, fill, why)


def _flex_mask(analysis: Analysis, q_len: int, kv_len: int, device):
    return flex.block_mask(analysis.structure.materialize(q_len, kv_len, device), q_len, kv_len)


def _run(plan: Plan, q, k, v, mask, scale, enable_gqa):
    kw = {"enable_gqa": True} if enable_gqa else {}
    if plan.kernel is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)
    if plan.kernel == "flex":
        try:
            return flex.attention(q, k, v, plan.block_mask, scale=scale, enable_gqa=enable_gqa)
        except Exception as e:  # e.g. Inductor cannot lower it for this shape: the dense mask, exactly
            log.warning("attnfx: FlexAttention failed for this mask (%s: %s); using the dense masked SDPA",
                        type(e).__name__, str(e).splitlines()[0][:120])
            plan.kernel, plan.block_mask = None, None
            plan.why = f"flex failed here ({type(e).__name__}); the dense masked SDPA is used"
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)
    return execute.run(plan.analysis.structure, plan.kernel, q, k, v, scale=scale, enable_gqa=enable_gqa,
                       fill=plan.fill or "zero")


def _autotune(plan: Plan, q, k, v, mask, scale, enable_gqa) -> Plan:
    """Time every exact candidate once on these inputs and keep the fastest (``autotune=True``)."""
    a = plan.analysis
    batch = q.shape[0] if q.dim() == 4 else 1
    timings = {}
    with torch.no_grad():
        for kernel in execute.candidates(a.structure, batch, q.shape[-2], k.shape[-2], q.device, q.dtype,
                                         q.shape[-1], plan.fill):
            trial = Plan(a, kernel, plan.fill, "")
            try:
                if kernel == "flex":
                    trial.block_mask = _flex_mask(a, q.shape[-2], k.shape[-2], q.device)
                timings[kernel] = _time(lambda: _run(trial, q, k, v, mask, scale, enable_gqa), q.device)
            except Exception as e:  # a candidate that does not run here is not a candidate
                log.info("attnfx: autotune candidate %s failed: %s", kernel, e)
    if not timings:
        return plan
    best = min(timings, key=timings.get)
    why = "autotuned: " + ", ".join(f"{k or 'dense'} {t * 1e3:.3f} ms" for k, t in sorted(timings.items(), key=lambda x: x[1]))
    return Plan(a, best, plan.fill, why)


def _time(fn, device, reps: int = 5) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def plan_for(rt: SiteRuntime, q, k, v, mask, key_tensors, key_ints, scale=None, enable_gqa=False) -> Plan:
    batch, heads, q_len, kv_len = q.shape[0] if q.dim() == 4 else 1, q.shape[-3], q.shape[-2], k.shape[-2]

    def analyse() -> Plan:
        analysis = classify(mask, batch, heads, q_len, kv_len)
        plan = decide(analysis, rt.no_key_rows, batch, q_len, kv_len, q.device, q.dtype, q.shape[-1],
                      rt.forced_kernel)
        tunable = analysis is not None and (not analysis.empty_rows or plan.fill is not None)
        if rt.autotune and rt.forced_kernel is None and tunable:
            plan = _autotune(plan, q, k, v, mask, scale, enable_gqa)
        if plan.kernel == "flex" and plan.block_mask is None:
            plan.block_mask = _flex_mask(analysis, q_len, kv_len, q.device)
        return plan

    # the same tensor objects at the same _version as on the previous call: the same plan, no key to build
    signature = (tuple(q.shape), tuple(k.shape), q.dtype, q.device, tuple(int(i) for i in key_ints),
                 tuple((id(t), t._version) for t in key_tensors))
    if rt.last is not None and rt.last[0] == signature and all(r() is t for r, t in zip(rt.last[2], key_tensors)):
        return rt.last[1]
    namespace = (*rt.namespace, tuple(q.shape), tuple(k.shape), q.dtype, q.device)
    plan = PLANS.get_or_compute(namespace, key_tensors, key_ints, analyse)
    rt.last = (signature, plan, [weakref.ref(t) for t in key_tensors])
    return plan


def _report(rt: SiteRuntime, plan: Plan) -> None:
    """Tell the site's record about a new plan, or a plan whose kernel changed (a run-time fallback)."""
    now = (plan, plan.kernel, plan.why)
    if rt.on_plan is not None and (rt.reported is None or any(a is not b for a, b in zip(rt.reported, now))):
        rt.reported = now
        rt.on_plan(plan)


def _forward(q, k, v, mask, key_tensors, key_ints, site_id: int, scale, enable_gqa):
    rt = SITES[site_id]
    plan = plan_for(rt, q, k, v, mask, key_tensors, key_ints, scale, enable_gqa)
    out = _run(plan, q, k, v, mask, scale, enable_gqa)
    _report(rt, plan)  # a new plan, or one whose kernel fell back while running
    return out


@torch.library.custom_op("attnfx::structured_attention", mutates_args=())
def structured_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         key_tensors: list[torch.Tensor], key_ints: list[int], site_id: int,
                         scale: Optional[float], enable_gqa: bool) -> torch.Tensor:
    return _forward(q, k, v, mask, key_tensors, key_ints, site_id, scale, enable_gqa).contiguous()


@structured_attention.register_fake
def _(q, k, v, mask, key_tensors, key_ints, site_id, scale, enable_gqa):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@contextlib.contextmanager
def _autograd_enabled():
    """Custom-op implementations run below the autograd dispatch keys; the recompute needs them back."""
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther)
    was = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in keys]
    try:
        for k in keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
        with torch.enable_grad():
            yield
    finally:
        for k, w in zip(keys, was):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, w)


@torch.library.custom_op("attnfx::structured_attention_backward", mutates_args=())
def structured_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  mask: torch.Tensor, key_tensors: list[torch.Tensor], key_ints: list[int],
                                  site_id: int, scale: Optional[float], enable_gqa: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recomputes the forward under autograd with the same plan and differentiates it."""
    with _autograd_enabled():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = _forward(qq, kk, vv, mask, key_tensors, key_ints, site_id, scale, enable_gqa)
        grads = torch.autograd.grad(out, (qq, kk, vv), grad, allow_unused=True)
    return tuple((g if g is not None else torch.zeros_like(t)).contiguous() for g, t in zip(grads, (q, k, v)))


@structured_attention_backward.register_fake
def _(grad, q, k, v, mask, key_tensors, key_ints, site_id, scale, enable_gqa):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, key_tensors, key_ints, site_id, scale, enable_gqa = inputs
    ctx.save_for_backward(q, k, v, mask, *key_tensors)
    ctx.rest = (len(key_tensors), list(key_ints), site_id, scale, enable_gqa)


def _backward(ctx, grad):
    q, k, v, mask, *key_tensors = ctx.saved_tensors
    n, key_ints, site_id, scale, enable_gqa = ctx.rest
    dq, dk, dv = torch.ops.attnfx.structured_attention_backward(grad, q, k, v, mask, key_tensors, key_ints, site_id,
                                                                scale, enable_gqa)
    return dq, dk, dv, None, [None] * n, [None] * len(key_ints), None, None, None


structured_attention.register_autograd(_backward, setup_context=_setup_context)


def describe(plan: Plan) -> dict[str, Any]:
    d = plan.analysis.describe() if plan.analysis is not None else {"kind": "bias"}
    d["kernel"] = plan.kernel or "sdpa (dense mask kept)"
    d["why"] = plan.why
    return d


# ---------------------------------------------------------------------------------------------------
# attnfx::npu_attention


@dataclass(eq=False)
class NpuSite:
    """What the NPU op needs to know about one rewritten site."""

    layer: int
    fp8: bool
    skip_steps: frozenset[int]
    skip_layers: frozenset[int]
    record: SiteRecord
    analysable: bool = True  # the mask derives from graph inputs only: its analysis can be cached
    calls: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))  # (step, quantized)


def _npu_structure(site_id: int, q, k, mask, key_tensors, key_ints):
    """The mask's structure, analysed once per distinct mask (the plan cache), if it has no empty rows."""
    batch = q.shape[0]
    analysis = PLANS.get_or_compute(("npu", site_id, tuple(q.shape), tuple(k.shape)), key_tensors, key_ints,
                                    lambda: classify(mask, batch, q.shape[1], q.shape[2], k.shape[2]))
    if analysis is None or analysis.empty_rows:
        return None
    return analysis.structure


@torch.library.custom_op("attnfx::npu_attention", mutates_args=())
def npu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  key_tensors: list[torch.Tensor], key_ints: list[int], site_id: int, scale: Optional[float],
                  is_causal: bool) -> torch.Tensor:
    rt = SITES[site_id]
    step = steps.current_step(rt.layer)
    skipped = steps.native_reason(rt.layer, step, rt.skip_steps, rt.skip_layers)
    quantize = rt.fp8 and skipped is None
    allowed = bias = structure = None
    if mask is not None and rt.analysable:
        structure = _npu_structure(site_id, q, k, mask, key_tensors, key_ints)
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
        "native precision: " + (skipped or "FP8 not requested"))
    rt.record.details["npu"] = {"op": call.op, "layout": call.layout, "sparse_mode": call.sparse_mode,
                                "quantized": quantize, "step": step, "layer": rt.layer, "why": why,
                                "mask": structure.describe() if structure is not None else None}
    return out.contiguous()


@npu_attention.register_fake
def _(q, k, v, mask, key_tensors, key_ints, site_id, scale, is_causal):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
