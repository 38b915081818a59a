"""The ``attnfx`` torch.compile backend: rewrite the attention in the graph Dynamo captured, then
hand the graph to the inner compiler (Inductor by default)."""

from __future__ import annotations

import copy
import logging
import time
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch._dynamo.backends.debugging import aot_eager
from torch._inductor.compile_fx import compile_fx

from attnfx.fx.sites import find_sites
from attnfx.options import Options
from attnfx.patterns import NAMES
from attnfx.rewriter.passes import run_passes
from attnfx.rewriter.report import Report
from attnfx.rewriter.verify import Verifier
from attnfx.runtime.guards import Guarded
from attnfx.runtime.invariants import InvariantCaching

log = logging.getLogger("attnfx")


def inner_compile(options: Options, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    compiler = options.compiler
    if callable(compiler):
        return compiler(gm, example_inputs)
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        return aot_eager(gm, example_inputs)
    return compile_fx(gm, example_inputs, config_patches=dict(options.inductor_config) or None)


class Backend:
    """A torch.compile backend that rewrites attention and keeps a report of what it did.

    ``torch.compile(model, backend=attnfx.Backend(compiler="eager"))``; ``backend.report``.
    """

    def __init__(self, options: Mapping[str, Any] | Options | None = None, *, report: Report | None = None,
                 root: Any = None, **more: Any):
        self.options = options if isinstance(options, Options) else Options.from_mapping(
            options, pattern_names=NAMES, **more)
        self.report = report if report is not None else Report()
        self.layers: dict = {}  # attention site -> layer index, across this backend's graphs
        # the model being optimized, when known: sites are named as its named_modules() names them
        self.root = weakref.ref(root) if isinstance(root, torch.nn.Module) else None

    def module_names(self) -> dict[int, str] | None:
        root = self.root() if self.root is not None else None
        return None if root is None else {id(m): name for name, m in root.named_modules()}

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        index = self.report.graphs
        captured = copy.deepcopy(gm.graph)
        start = time.perf_counter()
        guards: list = []
        names = self.module_names()
        keepalive: list = []  # run-time state of the rewritten sites: lives as long as what we return
        try:
            sites = run_passes(gm, self.options, index, self.layers, guards=guards, keepalive=keepalive,
                               example_inputs=example_inputs, module_names=names)
        except Exception as exc:
            if self.options.strict:
                raise
            # a bug of attnfx must never break the user's compile: compile the graph as captured
            log.warning("attnfx: internal error while rewriting graph %d; compiling it unchanged", index,
                        exc_info=True)
            gm.graph = copy.deepcopy(captured)
            gm.recompile()
            sites, guards = find_sites(gm, index, names), []
            for s in sites:
                s.record.note(f"attnfx internal error ({type(exc).__name__}: {exc}); graph left as captured")
        self.report.add_graph([s.record for s in sites])
        rewritten = sum(s.record.rewritten for s in sites)
        log.info("attnfx: graph %d: %d attention site(s), %d rewritten, in %.2fs; compiling with %s",
                 index, len(sites), rewritten, time.perf_counter() - start,
                 getattr(self.options.compiler, "__name__", self.options.compiler))
        compiled = self._compile(gm, example_inputs)
        if self.options.verify and rewritten:
            compiled = Verifier(fx.GraphModule(gm, captured), gm, compiled, sites, self.options, self.report)
        if guards:
            # compiled now, within Dynamo's tracing context (data-dependent sizes need its shape environment)
            general = fx.GraphModule(gm, copy.deepcopy(captured))
            try:
                run_passes(general, self.options, index, self.layers, keepalive=keepalive,  # nothing specialized
                           module_names=names)
            except Exception:
                if self.options.strict:
                    raise
                log.warning("attnfx: internal error while rewriting graph %d without run-time specialization; "
                            "that variant runs as captured", index, exc_info=True)
                general = fx.GraphModule(gm, copy.deepcopy(captured))
            general_compiled = self._compile(general, example_inputs, report=False)  # groups reported once
            for site in sites:
                mine = [g.stats for g in guards if any(r is site.record for r in g.sites)]
                if mine:
                    site.record.details["specialized_on"] = mine
            compiled = Guarded(compiled, general_compiled, guards, index)
        return KeepAlive(compiled, keepalive) if keepalive else compiled

    def _compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any], report: bool = True) -> Callable:
        if self.options.cache_invariants:
            return InvariantCaching(gm, example_inputs, lambda g, ex: inner_compile(self.options, g, ex),
                                    self.report.cached if report else [], self.report.not_cached if report else [],
                                    cache_weights=self.options.cache_invariants == "all")
        return inner_compile(self.options, gm, example_inputs)


class KeepAlive:
    """The compiled graph, holding the run-time state its custom ops reach by id (``attnfx.runtime.ops``):
    that state lives exactly as long as Dynamo keeps this callable."""

    def __init__(self, compiled: Callable, keepalive: list):
        self.compiled, self.keepalive = compiled, keepalive

    def __call__(self, *args: Any) -> Any:
        return self.compiled(*args)


DEFAULT_REPORT = Report()


def attnfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None):
    """The backend registered as ``torch.compile(..., backend="attnfx", options={...})``.

    Its sites go to the process-wide report, ``attnfx.report()``.
    """
    return Backend(options, report=DEFAULT_REPORT)(gm, example_inputs)
