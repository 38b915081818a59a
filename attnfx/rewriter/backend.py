"""The ``attnfx`` torch.compile backend: rewrite the attention in the graph Dynamo captured, then
hand the graph to the inner compiler (Inductor by default, in the mode asked for)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import sys
import threading
import time
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch
import torch._dynamo.config as dynamo_config
import torch.fx as fx
from torch._dynamo.backends.debugging import aot_eager
from torch._inductor import list_mode_options
from torch._inductor.compile_fx import compile_fx

from attnfx.fx.graph import like_dynamo_graph, placeholder_sources
from attnfx.fx.sites import find_sites
from attnfx.options import Options, OptionsError
from attnfx.patterns import NAMES
from attnfx.rewriter.passes import run_passes
from attnfx.rewriter.report import Report
from attnfx.rewriter.verify import Verifier
from attnfx.runtime.guards import Guarded
from attnfx.runtime.invariants import InvariantCaching

log = logging.getLogger("attnfx")
try:  # TORCH_LOGS=attnfx shows what attnfx does, graph by graph
    torch._logging._internal.register_log("attnfx", "attnfx")
except Exception:  # pragma: no cover - another torch's logging internals: the logger still works
    pass
PROGRESS_AFTER_S = float(os.environ.get("ATTNFX_PROGRESS_AFTER_S", "5"))  # a compile this long gets a line


def inner_compile(options: Options, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    compiler = options.compiler
    if callable(compiler):
        return compiler(gm, example_inputs)
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        return aot_eager(gm, example_inputs)
    # the mode's Inductor settings, as torch.compile(mode=...) applies them; explicit settings win
    patches = {**(list_mode_options(options.mode) if options.mode else {}), **options.inductor_config}
    return compile_fx(gm, example_inputs, config_patches=patches or None)


@contextlib.contextmanager
def _dynamic_output_shapes():
    """Dynamo keeps ops with data-dependent output shapes (``masked_select``: HunyuanImage3 reads its image
    rows so) in the graph instead of breaking it, for the frames this backend compiles only."""
    if dynamo_config.capture_dynamic_output_shape_ops:
        yield
        return
    dynamo_config.capture_dynamic_output_shape_ops = True
    try:
        yield
    finally:
        dynamo_config.capture_dynamic_output_shape_ops = False


class _Progress:
    """A line on stderr when a graph's rewrite and compile have taken PROGRESS_AFTER_S, and one when it is
    done: long first calls say what they are doing (``progress=False`` is quiet)."""

    def __init__(self, enabled: bool, what: str):
        self.what, self.start, self.said = what, time.perf_counter(), False
        self.timer = threading.Timer(PROGRESS_AFTER_S, self._say) if enabled else None
        if self.timer is not None:
            self.timer.daemon = True
            self.timer.start()

    def _say(self) -> None:
        self.said = True
        print(f"attnfx: {self.what} ...", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.said:
            print(f"attnfx: {self.what}: done in {time.perf_counter() - self.start:.1f} s", file=sys.stderr,
                  flush=True)


class Backend:
    """A torch.compile backend that rewrites attention and keeps a report of what it did.

    ``torch.compile(model, backend=attnfx.Backend(compiler="eager"))``; ``backend.report``. A copy of a backend
    is the backend itself (transformers' ``CompileConfig`` deep-copies what it is given): one report.
    """


    def __init__(self, options: Mapping[str, Any] | Options | None = None, *, report: Report | None = None,
                 root: Any = None, **more: Any):
        self.options = options if isinstance(options, Options) else Options.from_mapping(
            options, pattern_names=NAMES, **more)
        self.report = report if report is not None else Report()
        # entered by Dynamo around every frame it runs for this backend (an instance attribute: Dynamo's
        # wrapper of a backend copies the instance's __dict__)
        self.backend_ctx_ctor = _dynamic_output_shapes
        self.layers: dict = {}  # attention site -> layer index, across this backend's graphs
        # the model being optimized, when known: sites are named as its named_modules() names them
        self.root = weakref.ref(root) if isinstance(root, torch.nn.Module) else None

    def __deepcopy__(self, memo: dict) -> "Backend":
        return self

    def __copy__(self) -> "Backend":
        return self

    def module_names(self) -> dict[int, str] | None:
        root = self.root() if self.root is not None else None
        return None if root is None else {id(m): name for name, m in root.named_modules()}

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                 options: Mapping[str, Any] | None = None) -> Callable:
        """Rewrite and compile one graph. ``mode``/``options`` are what ``torch.compile(backend=this, mode=...,
        options=...)`` passes on (transformers' ``CompileConfig`` does): they apply to this call."""
        if mode is not None or options:
            more = {**(options or {}), **({"mode": mode} if mode is not None else {})}
            saved = self.options
            self.options = Options.from_mapping({**_fields(saved), **more}, pattern_names=NAMES)
            try:
                return self(gm, example_inputs)
            finally:
                self.options = saved
        index = self.report.graphs
        progress = _Progress(self.options.progress, f"graph {index}: rewriting attention and compiling "
                                                    f"with {self._compiler_name()}")
        try:
            return self._rewrite_and_compile(gm, example_inputs, index)
        finally:
            progress.done()

    def _compiler_name(self) -> str:
        name = getattr(self.options.compiler, "__name__", self.options.compiler)
        return f"{name} ({self.options.mode})" if self.options.mode and name == "inductor" else str(name)

    def _rewrite_and_compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any], index: int) -> Callable:
        captured = copy.deepcopy(gm.graph)
        sources = placeholder_sources(gm)  # lost by graph copies: given back to every graph Inductor compiles
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
            like_dynamo_graph(gm, gm, sources)
            sites, guards = find_sites(gm, index, names), []
            for s in sites:
                s.record.note(f"attnfx internal error ({type(exc).__name__}: {exc}); graph left as captured")
        self.report.add_graph([s.record for s in sites])
        rewritten = sum(s.record.rewritten for s in sites)
        log.info("attnfx: graph %d: %d attention site(s), %d rewritten, in %.2fs; compiling with %s",
                 index, len(sites), rewritten, time.perf_counter() - start, self._compiler_name())
        compiled = self._compile(gm, example_inputs)
        if self.options.verify and rewritten:
            compiled = Verifier(fx.GraphModule(gm, captured), gm, compiled, sites, self.options, self.report)
        if guards:
            # compiled now, within Dynamo's tracing context (data-dependent sizes need its shape environment)
            general = like_dynamo_graph(fx.GraphModule(gm, copy.deepcopy(captured)), gm, sources)
            try:
                run_passes(general, self.options, index, self.layers, keepalive=keepalive,  # nothing specialized
                           module_names=names)
            except Exception:
                if self.options.strict:
                    raise
                log.warning("attnfx: internal error while rewriting graph %d without run-time specialization; "
                            "that variant runs as captured", index, exc_info=True)
                general = like_dynamo_graph(fx.GraphModule(gm, copy.deepcopy(captured)), gm, sources)
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


def _fields(options: Options) -> dict[str, Any]:
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


class KeepAlive:
    """The compiled graph, holding the run-time state its custom ops reach by id (``attnfx.runtime.ops``):
    that state lives exactly as long as Dynamo keeps this callable."""

    def __init__(self, compiled: Callable, keepalive: list):
        self.compiled, self.keepalive = compiled, keepalive

    def __call__(self, *args: Any) -> Any:
        return self.compiled(*args)


DEFAULT_REPORT = Report()


def attnfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None,
                   mode: str | None = None):
    """The backend registered as ``torch.compile(..., backend="attnfx", options={...})`` (or ``mode=...``).

    Its sites go to the process-wide report, ``attnfx.report()``. Bad options raise ``attnfx.OptionsError``
    from the compiled call itself (raised here, Dynamo would wrap it in its own error).
    """
    try:
        backend = Backend({**(options or {}), **({"mode": mode} if mode else {})}, report=DEFAULT_REPORT)
    except OptionsError as e:
        error = e

        def raise_options_error(*args: Any) -> Any:
            raise error

        return raise_options_error
    return backend(gm, example_inputs)


attnfx_backend.backend_ctx_ctor = _dynamic_output_shapes  # type: ignore[attr-defined]
