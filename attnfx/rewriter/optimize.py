"""``attnfx.optimize(model)`` and ``attnfx.report(...)``."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Mapping

import torch

from attnfx.rewriter.backend import DEFAULT_REPORT, Backend
from attnfx.rewriter.report import Report

_BACKENDS: "weakref.WeakKeyDictionary[Any, Backend]" = weakref.WeakKeyDictionary()


def optimize(
    model: Any,
    *,
    compiler: str | Callable = "inductor",
    patterns: Iterable[str] | Mapping[str, bool] | None = None,
    verify: bool = False,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    **options: Any,
):
    """Return ``model`` compiled lazily through torch.compile with the attnfx backend.

    The result behaves like the original (same call signature and outputs, ``.eval()``, ``.to()``,
    shared parameters). Nothing is compiled until the first call; ``attnfx.report(result)`` then
    says what was rewritten at each attention site.

    compiler:  inner compiler after the rewrite: "inductor" (default), "eager" (run the rewritten
               graph as is), "aot_eager", or a callable(gm, example_inputs).
    patterns:  which rewrites are on: names (see attnfx.patterns.NAMES) or {name: bool}; default all.
    verify:    on the first call of each compiled graph, also run the original graph and raise
               attnfx.VerificationError naming the site if outputs differ beyond rounding
               (tolerances: rtol=/atol= override the per-dtype defaults).
    dynamic, fullgraph: passed to torch.compile.
    """
    if not (isinstance(model, torch.nn.Module) or callable(model)):
        raise TypeError(f"attnfx.optimize() takes an nn.Module or a callable, not {type(model).__name__}")
    backend = Backend(dict(compiler=compiler, patterns=patterns, verify=verify, **options), root=model)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    # not an attribute: OptimizedModule forwards attribute writes to the wrapped model, so a second
    # optimize() of the same model would overwrite the first one's
    _BACKENDS[compiled] = backend
    return compiled


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
