"""``attnfx.optimize(model)`` and ``attnfx.report(...)``."""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import threading
import warnings
import weakref
from typing import Any, Callable, Iterable, Mapping

import torch
from torch._dynamo.utils import counters

from attnfx.options import OptionsError
from attnfx.rewriter.backend import DEFAULT_REPORT, Backend
from attnfx.rewriter.report import Report

log = logging.getLogger("attnfx")

_BACKENDS: "weakref.WeakKeyDictionary[Any, Backend]" = weakref.WeakKeyDictionary()
# isolate_recompiles=True: each optimized model gets its own compiled-code cache, so models sharing code (a
# library's wrappers) do not use up each other's recompile limit
_ISOLATE = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def compile_with(backend: Backend, model: Any, *, dynamic: bool | None = None, fullgraph: bool = False) -> Any:
    """What ``torch.compile(model, backend=backend, ...)`` does, less its wrapping of the backend: Dynamo then
    sees the backend's own context (``Backend.backend_ctx_ctor``: masked_select kept in the graph)."""
    kwargs = {"isolate_recompiles": True} if _ISOLATE else {}
    return torch._dynamo.optimize(backend, nopython=fullgraph, dynamic=dynamic, **kwargs)(model)


def optimize(
    model: Any,
    *,
    compiler: str | Callable = "inductor",
    mode: str | None = None,
    patterns: Iterable[str] | Mapping[str, bool] | None = None,
    verify: bool = False,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    **options: Any,
):
    """Return ``model`` compiled lazily through torch.compile with the attnfx backend.

    The result behaves like the original (same call signature and outputs, ``.eval()``, ``.to()``,
    shared parameters; ``.generate()`` of a transformers model runs the optimized forward). Nothing is
    compiled until the first call; ``attnfx.report(result)`` then says what was rewritten at each
    attention site, and whether Dynamo compiled the model at all.

    compiler:  inner compiler after the rewrite: "inductor" (default), "eager" (run the rewritten
               graph as is), "aot_eager", or a callable(gm, example_inputs).
    mode:      torch.compile's mode for the Inductor compile: "default", "reduce-overhead" (CUDA graphs),
               "max-autotune", "max-autotune-no-cudagraphs".
    patterns:  which rewrites are on: names (see attnfx.patterns.NAMES) or {name: bool}; default all.
    verify:    on the first call of each compiled graph, also run the original graph and raise
               attnfx.VerificationError naming the site if outputs differ beyond rounding
               (tolerances: rtol=/atol= override the per-dtype defaults).
    dynamic, fullgraph: passed to torch.compile.
    """
    if not (isinstance(model, torch.nn.Module) or callable(model)):
        raise TypeError(f"attnfx.optimize() takes an nn.Module or a callable, not {type(model).__name__}")
    if dynamic not in (None, True, False):
        raise OptionsError(f"dynamic must be None, True or False, not {dynamic!r}")
    if not isinstance(fullgraph, bool):
        raise OptionsError(f"fullgraph must be True or False, not {fullgraph!r}")
    backend = Backend(dict(compiler=compiler, mode=mode, patterns=patterns, verify=verify, **options), root=model)
    compile_ = functools.partial(compile_with, backend, dynamic=dynamic, fullgraph=fullgraph)
    compiled = compile_(model)
    watch = _FirstCall(backend)
    if isinstance(compiled, torch.nn.Module):
        watch.hook(compiled)
        if callable(getattr(model, "generate", None)):
            # not an attribute write: OptimizedModule forwards those to the wrapped model
            object.__setattr__(compiled, "generate", _Generate(model, compile_, watch))
    else:
        compiled = watch.wrap(compiled)
    # not an attribute: OptimizedModule forwards attribute writes to the wrapped model, so a second
    # optimize() of the same model would overwrite the first one's
    _BACKENDS[compiled] = backend
    return compiled


class _FirstCall:
    """Over an optimized model's first call: did Dynamo compile it, and where did it break the graph, and why.
    Said in the report (``dynamo``) and, when nothing was compiled or the graph broke, as a warning."""

    def __init__(self, backend: Backend):
        self.backend, self.before, self.handles, self.done = backend, None, [], False
        self.lock = threading.Lock()

    def hook(self, module: torch.nn.Module) -> None:
        self.handles = [module.register_forward_pre_hook(lambda m, a: self.start()),
                        module.register_forward_hook(lambda m, a, o: self.finish())]

    def wrap(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if self.done:
                return fn(*args, **kwargs)
            self.start()
            out = fn(*args, **kwargs)
            self.finish()
            return out

        return call

    @contextlib.contextmanager
    def around(self):
        self.start()
        try:
            yield
        finally:
            self.finish()

    def start(self) -> None:
        with self.lock:
            if not self.done and self.before is None:
                self.before = _dynamo_events()

    def finish(self) -> None:
        with self.lock:
            if self.done or self.before is None:
                return
            self.done = True
            handles, self.handles = self.handles, []
            new = _dynamo_events() - self.before
        for h in handles:
            h.remove()
        reasons = [{"reason": msg.strip().splitlines()[0], "count": n} for msg, n in new.items()]
        report = self.backend.report
        report.dynamo["graph_breaks"] = reasons
        if report.graphs == 0:
            why = "; ".join(r["reason"] for r in reasons) or "no frame of it was compiled"
            report.dynamo["compiled"] = False
            report.dynamo["why"] = why
            warnings.warn(f"attnfx: Dynamo ran the model without compiling it ({why}); nothing was rewritten",
                          stacklevel=3)
        elif reasons:
            report.dynamo["compiled"] = True
            warnings.warn(f"attnfx: Dynamo broke the model into {report.graphs} graph(s) "
                          f"({'; '.join(r['reason'] for r in reasons)}); attention split across graphs is "
                          f"not rewritten", stacklevel=3)
        else:
            report.dynamo["compiled"] = True


def _dynamo_events() -> collections.Counter:
    """What Dynamo could not compile so far (skipped frames, graph breaks), by message, counted."""
    return collections.Counter(counters["unimplemented"]) + collections.Counter(counters["graph_break"])


class _Generate:
    """``optimized.generate(...)``: the model's own ``generate``, with every forward call it makes going through
    the attnfx-compiled forward (as transformers' own compile does for its decoding steps)."""

    def __init__(self, model: torch.nn.Module, compile_: Callable, watch: _FirstCall):
        self.model, self.compile_, self.watch = model, compile_, watch
        self.forward: Callable | None = None
        self.lock = threading.Lock()
        functools.update_wrapper(self, model.generate)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        with self.lock:
            if self.forward is None:
                self.forward = self.compile_(type(model).forward.__get__(model))
        kwargs.setdefault("disable_compile", True)  # transformers would compile __call__ itself, without attnfx
        previous = model.__dict__.get("forward")
        model.__dict__["forward"] = self.forward
        try:
            with self.watch.around():
                return model.generate(*args, **kwargs)
        finally:
            if previous is None:
                model.__dict__.pop("forward", None)
            else:
                model.__dict__["forward"] = previous


def report(obj: Any = None) -> Report:
    """The rewrite report of a model returned by :func:`optimize` (after at least one call).

    With no argument: the report of every graph compiled with ``backend="attnfx"`` in this process.
    """
    if obj is None:
        return DEFAULT_REPORT
    if isinstance(obj, Backend):
        return obj.report
    try:
        backend = _BACKENDS.get(obj)
    except TypeError:  # unhashable
        backend = None
    if backend is None:
        raise TypeError(
            "attnfx.report() takes a model returned by attnfx.optimize() or an attnfx.Backend; for "
            "torch.compile(model, backend='attnfx') call attnfx.report() with no argument")
    return backend.report
