"""The custom ops rewritten graphs call, and the per-site state they reach by an int id.

``attnfx::structured_attention``: masked SDPA whose mask is only known at run time. The op is opaque to Inductor (a ``torch.library`` custom op with a fake impl; its backward is a custom op
too). At run time it looks the mask's plan up in the input cache — keyed on the *graph inputs* the mask is
computed from, so a hit costs no device read and no host sync — and on a miss classifies the mask once
(``attnfx.masks.classify``), verifies the structure by materializing it, chooses the kernel, and stores
the plan. Every layer that uses the same mask shares that plan. A mask without structure (or whose rows
with no allowed key cannot be reproduced) runs the original dense masked SDPA.

``attnfx::npu_attention``: SDPA on Ascend's fused infer attention (``attnfx.backends.npu``), natively or with
online FP8, the mask analysed once per distinct mask.

``attnfx::fp8_attention``: online FP8 attention on CUDA (``attnfx.backends.cudnn_fp8``) on inputs the graph has
already rotated and quantized, or the native kernel — chosen per call (steps, layers, the error bound). Tagged
``cudagraph_unsafe``: under CUDA graphs (mode="reduce-overhead") Inductor leaves it out of the captured graphs,
so its per-call choice is made on every call, never frozen into a replay.

Per-site state lives in :data:`SITES`, which holds it weakly: the compiled graph keeps it alive (the
``keepalive`` list the backend attaches to what it returns), so it goes when the graph goes.

Concurrent calls: shared state is read once into locals (``rt.last``, a plan's kernel) and replaced whole,
never edited field by field where another call could read it half-written; plans are immutable once
stored, except that a flex plan falling back to the dense SDPA switches its ``kernel`` (one write).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from attnfx.backends import capabilities, cost, cudnn_fp8, execute, flex, npu
from attnfx.fx.sites import SiteRecord
from attnfx.masks import Analysis, General, allowed_of, classify
from attnfx.runtime import steps
from attnfx.runtime.cache import InputCache, generation, tensor_bytes, versioned

log = logging.getLogger("attnfx")

PLANS = InputCache(max_entries=256, max_bytes=256 << 20)


@dataclass
class Plan:
    analysis: Analysis | None
    kernel: str | None  # None: the dense masked SDPA
    fill: str | None
    why: str
    block_mask: Any = None  # for the flex kernel: derived from the mask once
    cost: dict | None = None  # the cost model's estimates behind the choice (attnfx.backends.cost)
    analysis_stopped: bool = False  # the site stopped reading masks (they were new on every call)

    @property
    def nbytes(self) -> int:
        """Device memory the plan holds: a general mask kept for its kernel, the flex block mask."""
        structure = self.analysis.structure if self.analysis is not None else None
        held = tensor_bytes(structure.dense) if isinstance(structure, General) and structure.dense is not None else 0
        return held + (flex.nbytes(self.block_mask) if self.block_mask is not None else 0)


@dataclass
class SiteRuntime:
    """What the op needs to know about one rewritten site."""

    namespace: tuple  # identifies the mask expression: sites sharing a mask node share plans
    no_key_rows: dict[str, str]  # what the original kernel gives on rows with no allowed key, per spelling
    forced_kernel: str | None = None
    autotune: bool = False
    on_plan: Callable[[Plan], None] | None = None  # reports each new plan
    reported: tuple | None = None  # (plan, its kernel and why) last reported; the plan held, not an id()
    # (signature, plan, weak refs to the key tensors) of the previous call: the common case, checked first;
    # replaced whole, read once
    last: tuple | None = None
    new_in_a_row: int = 0  # calls in a row that brought a mask not seen before
    varying: Plan | None = None  # set once masks are new on every call: the dense plan, used from then on


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
           dtype: torch.dtype, head_dim: int, forced: str | None, heads: int = 1) -> Plan:
    """The plan for a classified mask — its kernel (None: the dense masked SDPA) and what its rows with no
    allowed key get. Shared by the compile-time (static) and the run-time analysis. Unless forced, a kernel is
    kept only where the cost model (``attnfx.backends.cost``) says it beats the dense masked SDPA."""
    if analysis is None:
        return Plan(None, None, None, "the mask holds values other than 0 and -inf/finfo.min: an additive bias")
    fill = None
    if analysis.empty_rows:
        fill = no_key_rows.get(analysis.spelling, "unknown")
        if fill not in execute.FILLS:
            return Plan(analysis, None, None, f"{analysis.empty_rows} row(s) have no allowed key and the original "
                                              f"kernel gives '{fill}' there: kept dense to match it")
    kernel, why = execute.choose_kernel(analysis.structure, batch, q_len, kv_len, device, dtype, head_dim, forced)
    if kernel is None or forced is not None:
        return Plan(analysis, kernel, fill, why)
    estimates = cost.compare(analysis.structure, kernel, torch.device(device).type, batch, heads, q_len, kv_len,
                             head_dim, torch.empty((), dtype=dtype).element_size(), analysis.structure.batch)
    if estimates is None:
        return Plan(analysis, kernel, fill, why)
    dense, structured = estimates
    numbers = f"dense {dense.seconds * 1e6:.1f} us vs {kernel} {structured.seconds * 1e6:.1f} us (estimated)"
    if not cost.pays(dense, structured):
        return Plan(analysis, None, fill, f"cost model: {numbers}: the dense mask is kept",
                    cost={"dense": dense.describe(), kernel: structured.describe()})
    return Plan(analysis, kernel, fill, f"{why}; {numbers}", cost={"dense": dense.describe(), kernel: structured.describe()})


def _flex_mask(analysis: Analysis, q_len: int, kv_len: int, device):
    return flex.block_mask_for(analysis.structure, q_len, kv_len, device)


def _run(plan: Plan, q, k, v, mask, scale, enable_gqa):
    kw = {"enable_gqa": True} if enable_gqa else {}
    kernel = plan.kernel  # read once: another call may switch a failing flex plan to the dense SDPA
    if kernel is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)
    if kernel == "flex":
        try:
            return flex.attention(q, k, v, plan.block_mask, scale=scale, enable_gqa=enable_gqa)
        except Exception as e:  # e.g. Inductor cannot lower it for this shape: the dense mask, exactly
            log.warning("attnfx: FlexAttention failed for this mask (%s: %s); using the dense masked SDPA",
                        type(e).__name__, str(e).splitlines()[0][:120])
            plan.why = f"flex failed here ({type(e).__name__}); the dense masked SDPA is used"
            plan.kernel = None  # the block mask stays: a call that read "flex" before this line still needs it
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)
    return execute.run(plan.analysis.structure, kernel, q, k, v, scale=scale, enable_gqa=enable_gqa,
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


STOP_ANALYSING_AFTER = 4  # new masks in a row after which a site stops reading masks: each read is a host sync


def plan_for(rt: SiteRuntime, q, k, v, mask, key_tensors, key_ints, scale=None, enable_gqa=False) -> Plan:
    varying = rt.varying
    if varying is not None:  # masks change on every call: the dense mask, nothing read
        return varying
    batch, heads, q_len, kv_len = q.shape[0] if q.dim() == 4 else 1, q.shape[-3], q.shape[-2], k.shape[-2]
    analysed = False

    def analyse() -> Plan:
        nonlocal analysed
        analysed = True
        analysis = classify(mask, batch, heads, q_len, kv_len)
        plan = decide(analysis, rt.no_key_rows, batch, q_len, kv_len, q.device, q.dtype, q.shape[-1],
                      rt.forced_kernel, heads=heads)
        tunable = analysis is not None and (not analysis.empty_rows or plan.fill is not None)
        if rt.autotune and rt.forced_kernel is None and tunable:
            plan = _autotune(plan, q, k, v, mask, scale, enable_gqa)
        if plan.kernel == "flex" and plan.block_mask is None:
            plan.block_mask = _flex_mask(analysis, q_len, kv_len, q.device)
        if plan.kernel is None and analysis is not None and isinstance(analysis.structure, General):
            # the dense SDPA reads the mask passed in: holding the classified copy would only keep memory
            plan.analysis = dataclasses.replace(analysis, structure=General())
        return plan

    # the same tensor objects at the same _version as on the previous call: the same plan, no key to build.
    # Tensors without a version counter (inference mode) go through the cache, which confirms their contents.
    shortcut = all(versioned(t) for t in key_tensors)
    if shortcut:
        signature = (tuple(q.shape), tuple(k.shape), q.dtype, q.device, tuple(int(i) for i in key_ints),
                     tuple((id(t), t._version) for t in key_tensors), generation())
        last = rt.last  # read once: other threads replace it
        if last is not None and last[0] == signature and all(r() is t for r, t in zip(last[2], key_tensors)):
            return last[1]
    namespace = (*rt.namespace, tuple(q.shape), tuple(k.shape), q.dtype, q.device)
    plan = PLANS.get_or_compute(namespace, key_tensors, key_ints, analyse, nbytes=lambda p: p.nbytes)
    rt.new_in_a_row = rt.new_in_a_row + 1 if analysed else 0
    if rt.new_in_a_row >= STOP_ANALYSING_AFTER and rt.forced_kernel is None and not rt.autotune:
        rt.varying = Plan(None, None, None, f"a new mask on each of {rt.new_in_a_row} calls in a row: masks are no "
                                            "longer read (each read is a host sync); the dense mask is used",
                          analysis_stopped=True)
    if shortcut:
        rt.last = (signature, plan, [weakref.ref(t) for t in key_tensors])
    return plan


def _report(rt: SiteRuntime, plan: Plan) -> None:
    """Tell the site's record about a new plan, or a plan whose kernel changed (a run-time fallback)."""
    now = (plan, plan.kernel, plan.why)
    reported = rt.reported
    if rt.on_plan is not None and (reported is None or any(a is not b for a, b in zip(reported, now))):
        rt.reported = now
        rt.on_plan(plan)


def _forward(q, k, v, mask, key_tensors, key_ints, site_id: int, scale, enable_gqa):
    rt = SITES[site_id]
    plan = plan_for(rt, q, k, v, mask, key_tensors, key_ints, scale, enable_gqa)
    out = _run(plan, q, k, v, mask, scale, enable_gqa)
    _report(rt, plan)  # a new plan, or one whose kernel fell back while running
    return out


# ops that decide per call in Python (a plan per mask, FP8 or not per step) must never be frozen into a CUDA
# graph replay: the tag keeps them out of captured graphs (Inductor partitions the graph around them, or does
# not capture that graph)
_CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_CUDAGRAPH_UNSAFE_TAGS = ({"tags": (_CUDAGRAPH_UNSAFE,)} if _CUDAGRAPH_UNSAFE is not None
                          and "tags" in inspect.signature(torch.library.custom_op).parameters else {})


@torch.library.custom_op("attnfx::structured_attention", mutates_args=(), **_CUDAGRAPH_UNSAFE_TAGS)
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
    d = plan.analysis.describe() if plan.analysis is not None else {
        "kind": "not read" if plan.analysis_stopped else "bias"}
    d["kernel"] = plan.kernel or "sdpa (dense mask kept)"
    d["why"] = plan.why
    if plan.cost:
        d["cost"] = plan.cost
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
    """The mask's structure, analysed once per distinct mask (the plan cache), if it has no empty rows (a
    general mask is passed dense: its classified copy is not kept)."""
    batch = q.shape[0]

    def analyse():
        analysis = classify(mask, batch, q.shape[1], q.shape[2], k.shape[2])
        if analysis is None or analysis.empty_rows:
            return None
        return General() if isinstance(analysis.structure, General) else analysis.structure

    return PLANS.get_or_compute(("npu", site_id, tuple(q.shape), tuple(k.shape)), key_tensors, key_ints, analyse)


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


# ---------------------------------------------------------------------------------------------------
# attnfx::fp8_attention

_VERIFY = threading.local()


@dataclass(eq=False)
class Fp8Site:
    """What the FP8 op needs to know about one rewritten site, and what it did there (written to the report)."""

    layer: int
    skip_steps: frozenset[int]
    skip_layers: frozenset[int]
    max_error: float
    record: SiteRecord
    n_rep: int = 1  # query heads per K/V head
    disabled: str | None = None  # why the site stays native from now on (the error bound)
    error: float | None = None  # relative L2 of its FP8 output vs the native kernel, measured once
    supported: dict = field(default_factory=dict)  # (device, dtype) -> None or why the kernel does not run there
    counts: collections.Counter = field(default_factory=collections.Counter)  # "fp8" / "native (why)" -> calls
    calls: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))  # (step, precision)


@contextlib.contextmanager
def verifying():
    """Verification's run of a rewritten graph: FP8 sites run quantized whatever the step (so their error is
    measured now), and the step count is restored afterwards (the real call then runs as the same step)."""
    was = getattr(_VERIFY, "active", False)
    _VERIFY.active = True
    try:
        with steps.rerun():
            yield
    finally:
        _VERIFY.active = was


def _fp8_native_why(rt: Fp8Site, step: int, q: torch.Tensor, head_dim: int) -> str | None:
    if rt.disabled is not None:
        return rt.disabled
    why = steps.native_reason(rt.layer, step, rt.skip_steps, rt.skip_layers)
    if why == "step skipped" and getattr(_VERIFY, "active", False):
        why = None  # verification measures the FP8 path now
    if why is None:
        key = (q.device, q.dtype)
        if key not in rt.supported:
            arch = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
            rt.supported[key] = capabilities.supports(cudnn_fp8.KERNEL, device=q.device.type, dtype=q.dtype,
                                                      head_dim=head_dim, arch=arch)
        if rt.supported[key] is not None:
            why = f"kernel unavailable: {rt.supported[key]}"
    return why


def _native_attention(q, k, v, scale, is_causal, enable_gqa) -> torch.Tensor:
    kw = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, **kw).contiguous()


def _fp8_report(rt: Fp8Site, step: int, why: str | None, graph: Any = None) -> None:
    precision = "fp8" if why is None else "native"
    rt.counts["fp8" if why is None else f"native ({why.split(':')[0]})"] += 1
    rt.calls.append((step, precision))
    d = rt.record.details.setdefault("fp8", {})
    d["calls"] = dict(rt.counts)
    d["last"] = {"step": step, "precision": precision, "why": why}
    d["disabled"] = rt.disabled
    if graph is not None and not isinstance(d.get("kernel"), dict):
        d["kernel"] = {"name": cudnn_fp8.KERNEL, **cudnn_fp8.versions(cudnn_fp8.load()),
                       "padded_to": graph.length + graph.pad if graph.pad else None, "binding": cudnn_fp8.BINDING[0]}


@torch.library.custom_op("attnfx::fp8_attention", mutates_args=(), **_CUDAGRAPH_UNSAFE_TAGS)
def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q8: Optional[torch.Tensor],
                  k8: Optional[torch.Tensor], v8: Optional[torch.Tensor], descale_q: Optional[torch.Tensor],
                  descale_k: Optional[torch.Tensor], descale_v: Optional[torch.Tensor],
                  scale_o: Optional[torch.Tensor], v_mean: Optional[torch.Tensor], site_id: int, attn_scale: float,
                  scale: Optional[float], is_causal: bool, enable_gqa: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o8, native, use_fp8): the graph takes dequantize(o8) where use_fp8, else native; the other output is
    left uninitialized (``torch.where`` never reads it into the result)."""
    rt = SITES[site_id]
    step = steps.current_step(rt.layer)
    shape = (*q.shape[:-1], v.shape[-1])
    why = "layer skipped" if q8 is None else _fp8_native_why(rt, step, q, max(q.shape[-1], v.shape[-1]))
    o8 = graph = native = None
    if why is None:
        try:
            o8, graph = cudnn_fp8.attention(q8, k8, v8, descale_q, descale_k, descale_v, scale_o,
                                            attn_scale=attn_scale, causal=is_causal)
        except cudnn_fp8.KernelRefused as e:
            why = f"kernel unavailable: {e}"
        except Exception as e:  # noqa: BLE001 — the kernel failed to run: native from now on, never a crash
            rt.disabled = why = f"kernel failed: {cudnn_fp8.short(e)}"
            log.warning("attnfx: FP8 attention failed at %s (%s); the site runs natively from now on",
                        rt.record.module, why)
    if why is None and rt.error is None:  # the first FP8 call measures its error against the native kernel
        native = _native_attention(q, k, v, scale, is_causal, enable_gqa)
        deq = cudnn_fp8.dequantize(o8, descale_v, v_mean, rt.n_rep, q.dtype)
        rt.error = float(cudnn_fp8.rel_l2(deq, native))  # one host sync, once per site
        rt.record.details.setdefault("fp8", {})["error"] = {
            "rel_l2": rt.error, "bound": rt.max_error, "step": step,
            "measured": "first FP8 call, against the native kernel on the same inputs"}
        if not rt.error <= rt.max_error:  # NaN too
            rt.disabled = why = f"error bound: relative L2 {rt.error:.3g} > fp8_max_error {rt.max_error:g}"
    if why is None:
        out = (o8, q.new_empty(shape), torch.ones((), dtype=torch.bool, device=q.device))
    else:
        if native is None:
            native = _native_attention(q, k, v, scale, is_causal, enable_gqa)
        out = (q.new_empty(shape, dtype=cudnn_fp8.FP8), native, torch.zeros((), dtype=torch.bool, device=q.device))
    _fp8_report(rt, step, why, graph)
    return out


@fp8_attention.register_fake
def _(q, k, v, q8, k8, v8, descale_q, descale_k, descale_v, scale_o, v_mean, site_id, attn_scale, scale, is_causal,
      enable_gqa):
    shape = (*q.shape[:-1], v.shape[-1])
    return (q.new_empty(shape, dtype=cudnn_fp8.FP8), q.new_empty(shape),
            torch.empty((), dtype=torch.bool, device=q.device))
