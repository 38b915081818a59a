"""Per-step invariant caching: what every call recomputes identically is computed once per distinct input.

Denoising loops call the model 20-50 times with mostly the same inputs — only latents and timestep
change — and models rebuild, every call, RoPE tables from ids, text projections, mask conversions,
constants. A compiled graph is split:

* every node gets its *dependency set*: the graph inputs (tensors and symbolic sizes) its value reads,
  parameters and buffers left out (they are keyed on, never cut on);
* a *cut* is a node whose value some user combines with further inputs (``q * rope_cos``, the table
  computed from ids alone): its value can be computed apart and handed over;
* cuts with the same dependency set form a *group*, computed by a small prefix graph; the remainder of
  the graph takes the groups' values as extra inputs and goes to the inner compiler (Inductor) as usual;
* a group's values come from the input cache (``attnfx.runtime.cache``) keyed on the identity of *all*
  its inputs, parameters included (storage, offset, shape, stride, dtype, ``_version``) — computed on a
  miss.

Values that read an ``nn.Parameter`` are not cut by default (option ``cache_invariants=True``): weights are
edited in ways the keys cannot see — through ``.data`` (PEFT's LoRA merge, diffusers' ``fuse_lora``),
bypassing the version counter — so such values are computed every call, inside the remainder, as the
uncut graph computes them; a cut then stops where a value meets a parameter (the constant-only part of
an embedding stays cached, its linear layer does not). The report lists each group kept uncut and why.
``cache_invariants="all"`` cuts them too (the user calls ``attnfx.clear_caches()`` after editing weights
through ``.data``). Buffers are cached like inputs (version-keyed).

Which inputs stay the same is found at run time, not from a hint:
* at compile time, groups that read no tensor input (sizes, constants, parameters only) are cut — valid
  for every call, also under dynamic shapes;
* for graphs with static shapes, the tensor inputs that were the same tensor (or one of two alternating
  tensors, as when CFG branches are called one by one) over the first four calls are taken as stable, and
  a second remainder is compiled that also receives their groups; a group that then misses repeatedly
  sends the calls back to the first remainder.

Never cut: values reading an input the graph writes in place, values whose computation holds random ops
or in-place writes, views of inputs (nothing to save). While gradients are recorded through a group's
inputs it is computed, not cached. A cut value equals what the uncut graph computes: the same ops on the
same inputs (bit-identical with the eager inner compiler; with Inductor, up to its fusion rounding). Not
visible to the keys: writes through ``.data`` and by foreign kernels.

Concurrent calls: learning is done by one call (under a lock), the others run the compile-time split
meanwhile; a group's counters are updated under its lock and only decide whether to keep caching.
"""

from __future__ import annotations

import copy
import itertools
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from attnfx.fx.graph import call_name, fake, like_dynamo_graph, mutated_inputs, numel_hint
from attnfx.fx.static import closure, replays_differently
from attnfx.runtime.cache import InputCache, tensor_bytes, tensor_key

log = logging.getLogger("attnfx")

INVARIANTS = InputCache(max_entries=256, max_bytes=4 << 30)
MISSES_BEFORE_VARYING = 3  # consecutive misses before a group counts as varying

_VIEW_NAMES = {"getitem", "view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "t",
               "contiguous", "flatten", "narrow", "select", "to", "detach", "size", "dim", "float", "half",
               "bfloat16", "type_as", "clone"}
_PARAM_NAME = re.compile(r"_(parameters|buffers)_")
_WEIGHT_NAME = re.compile(r"_parameters_")
NOT_CACHED_WEIGHTS = ("reads parameters, whose edits through .data (LoRA merge, fuse_lora) the cache cannot see; "
                      "cache_invariants='all' caches it")
_uids = itertools.count()


@dataclass
class Group:
    """Cut values that read the same graph inputs."""

    keys: tuple[int, ...]  # placeholder indices the cache key is made of (parameters included)
    cuts: list[str]  # node names, in graph order
    prefix: fx.GraphModule
    ops: int  # compute ops the prefix runs: what a hit saves
    nbytes: int  # bytes of the cut values at the traced shapes
    what: str
    phase: str  # "compile time" | "learned at run time"
    why_not: str | None = None  # set on groups kept uncut: why their values are not cached
    uid: int = field(default_factory=lambda: next(_uids))
    computed: int = 0
    hits: int = 0
    misses_in_a_row: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def varying(self) -> bool:
        return self.misses_in_a_row >= MISSES_BEFORE_VARYING

    def describe(self) -> dict[str, Any]:
        if self.why_not is not None:
            return {"computes": self.what, "values": len(self.cuts), "found": self.phase, "why": self.why_not}
        return {"computes": self.what, "values": len(self.cuts), "found": self.phase,
                "ops_saved_per_hit": self.ops, "bytes_held": self.nbytes, "computed": self.computed,
                "hits": self.hits}


class Dependencies:
    """Dependency sets of a graph's nodes and the candidate cuts."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], cache_weights: bool = False):
        self.gm = gm
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        self.params = {i for i, (p, ex) in enumerate(zip(self.placeholders, example_inputs))
                       if isinstance(ex, torch.nn.Parameter) or _PARAM_NAME.search(p.name)}
        # nn.Parameters: edited through .data by LoRA merges and the like, cut only with cache_weights
        self.weights = {i for i in self.params if isinstance(example_inputs[i], torch.nn.Parameter)
                        or _WEIGHT_NAME.search(self.placeholders[i].name)}
        self.tensor_inputs = {i for i, ex in enumerate(example_inputs) if isinstance(ex, torch.Tensor)}
        self.mutated = mutated_inputs(gm.graph)
        index = {n: i for i, n in enumerate(self.placeholders)}
        self.deps: dict[fx.Node, frozenset[int]] = {}  # without parameters
        self.all_deps: dict[fx.Node, frozenset[int]] = {}
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                self.all_deps[n] = frozenset((index[n],))
            else:
                acc: frozenset[int] = frozenset()
                for a in n.all_input_nodes:
                    acc |= self.all_deps[a]
                self.all_deps[n] = acc
            self.deps[n] = self.all_deps[n] - self.params
        self.candidates = [n for n in gm.graph.nodes if self._cuttable(n, cache_weights)]
        # what cache_weights would cut besides, for the report: values kept uncut because they read weights
        self.weight_candidates = [] if cache_weights else [
            n for n in gm.graph.nodes if self.all_deps[n] & self.weights and self._cuttable(n, True)]

    def _reads_weights(self, n: fx.Node) -> bool:
        return bool(self.all_deps[n] & self.weights)

    def _cuttable(self, n: fx.Node, cache_weights: bool) -> bool:
        if n.op not in ("call_function", "call_method") or _is_view_of_input(n):
            return False
        if not isinstance(fake(n), torch.Tensor) or self.all_deps[n] & self.mutated:
            return False
        if not cache_weights and self._reads_weights(n):
            return False
        # cut where the value meets further inputs (or, weights not cached, a parameter)
        if not any(u.op != "output" and (self.deps[u] > self.deps[n] or (not cache_weights and self._reads_weights(u)))
                   for u in n.users):
            return False
        region = closure(n, self.output)
        return not any(replays_differently(r) for r in region) and _compute_ops(region) > 0

    def groups(self, stable: set[int], phase: str) -> list[Group]:
        """Groups of the candidate cuts whose tensor inputs (parameters aside) are all in ``stable``."""
        return self._groups(self.candidates, stable, phase)

    def uncut(self, stable: set[int], phase: str) -> list[Group]:
        """The groups kept uncut because they read weights (``cache_weights`` off), for the report."""
        return self._groups(self.weight_candidates, stable, phase, NOT_CACHED_WEIGHTS)

    def _groups(self, candidates: list[fx.Node], stable: set[int], phase: str, why_not: str | None = None
                ) -> list[Group]:
        chosen = [n for n in candidates if (self.deps[n] & self.tensor_inputs) <= stable]
        by_deps: dict[frozenset[int], list[fx.Node]] = {}
        for c in chosen:
            by_deps.setdefault(self.deps[c], []).append(c)
        return [self._group(cuts, phase, why_not) for cuts in by_deps.values()]

    def _group(self, cuts: list[fx.Node], phase: str, why_not: str | None = None) -> Group:
        needed: set[fx.Node] = set()
        for c in cuts:
            needed |= closure(c, self.output)
        keys = sorted(i for i, p in enumerate(self.placeholders) if p in needed)
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i in keys:
            p = self.placeholders[i]
            env[p] = sub.placeholder(p.name)
            env[p].meta = dict(p.meta)
        order = list(self.gm.graph.nodes)
        for n in order:
            if n in needed and n.op != "placeholder":
                env[n] = sub.node_copy(n, lambda x: env[x])
        sub.output(tuple(env[c] for c in cuts))
        nbytes = sum(numel_hint(fake(c)) * fake(c).element_size() for c in cuts)
        body = [n for n in order if n in needed and n.op != "placeholder"]
        # a group kept uncut is described by what is computed every call: the ops reading weights
        what = _describe([n for n in body if self._reads_weights(n)] if why_not else body)
        return Group(tuple(keys), [c.name for c in cuts], fx.GraphModule(self.gm, sub), _compute_ops(body),
                     nbytes, what, phase, why_not)

    def remainder(self, groups: list[Group]) -> fx.GraphModule:
        """The graph with every group's cut values taken as extra inputs, in group order."""
        graph = copy.deepcopy(self.gm.graph)
        nodes = {n.name: n for n in graph.nodes}
        names = [c for g in groups for c in g.cuts]
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
        for name in names:
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(f"attnfx_cached_{name}")
            anchor.meta = dict(nodes[name].meta)
            nodes[name].replace_all_uses_with(anchor)
        for n in reversed(list(graph.nodes)):  # what only fed the cut values goes (pure ops only)
            if n.op in ("call_function", "call_method") and not n.users and not replays_differently(n) and not n.is_impure():
                graph.erase_node(n)
        graph.lint()
        return like_dynamo_graph(fx.GraphModule(self.gm, graph), self.gm)  # static inputs stay static


def _is_view_of_input(n: fx.Node) -> bool:
    while n.op in ("call_method", "call_function") and call_name(n) in _VIEW_NAMES:
        if not n.args or not isinstance(n.args[0], fx.Node):
            return False
        n = n.args[0]
    return n.op in ("placeholder", "get_attr")


def _compute_ops(nodes) -> int:
    return sum(1 for n in nodes if n.op in ("call_function", "call_method") and call_name(n) not in _VIEW_NAMES)


def _describe(nodes) -> str:
    names: list[str] = []
    for n in nodes:
        if n.op in ("call_function", "call_method") and call_name(n) not in _VIEW_NAMES and call_name(n) not in names:
            names.append(call_name(n))
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


class Variant:
    """A compiled remainder and the groups whose values it takes."""

    def __init__(self, compiled: Callable, groups: list[Group]):
        self.compiled, self.groups = compiled, groups

    def __call__(self, args: Sequence[Any]):
        extra: list = []
        for g in self.groups:
            extra.extend(_values(g, [args[i] for i in g.keys]))
        return self.compiled(*args, *extra)


def _values(g: Group, inputs: list) -> tuple:
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    if g.varying or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _compute(g, inputs)
    computed = False

    def compute() -> tuple:
        nonlocal computed
        computed = True
        return _compute(g, inputs)

    vals = INVARIANTS.get_or_compute(g.uid, tensors, [i for i in inputs if not isinstance(i, torch.Tensor)],
                                     compute, nbytes=lambda vs: sum(tensor_bytes(v) for v in vs))
    with g.lock:
        if computed:
            g.misses_in_a_row += 1
        else:
            g.hits += 1
            g.misses_in_a_row = 0
    return vals


def _data_dependent_sizes(gm: fx.GraphModule) -> bool:
    return any(isinstance(fake(n), torch.Tensor) and free_unbacked_symbols(fake(n)) for n in gm.graph.nodes)


def _compute(g: Group, inputs: list) -> tuple:
    with g.lock:
        g.computed += 1
    return tuple(g.prefix(*inputs))


class InvariantCaching:
    """The callable the backend returns: feeds the compiled remainder with cached invariant values, and
    learns over the first calls which tensor inputs stay the same.

    ``cache_weights``: also cut values that read ``nn.Parameter``s (``cache_invariants="all"``); otherwise
    they stay in the remainder and are listed in ``report_uncut`` with the reason."""

    LEARN_CALLS = 4  # an input seen as at most LEARN_CALLS // 2 distinct tensors counts as stable

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], compile_fn: Callable,
                 report_groups: list, report_uncut: list | None = None, cache_weights: bool = False):
        self.deps = Dependencies(gm, example_inputs, cache_weights)
        self.compile_fn = compile_fn
        self.report_groups = report_groups
        self.report_uncut = report_uncut if report_uncut is not None else []
        groups = self.deps.groups(set(), "compile time")
        self._report_uncut(self.deps.uncut(set(), "compile time"))
        self.base = self._variant(groups, example_inputs, fake_extras=True)
        self.current = self.base
        # learned variants are compiled later, outside Dynamo's tracing context: only for graphs whose
        # shapes are all known (no symbolic input sizes, no data-dependent sizes from masked_select & co.)
        static = not any(isinstance(x, torch.SymInt) for x in example_inputs) and not _data_dependent_sizes(gm)
        learnable = {i for n in self.deps.candidates + self.deps.weight_candidates
                     for i in self.deps.deps[n] & self.deps.tensor_inputs}
        self.learning = static and bool(learnable)
        self.seen: list[dict[int, tuple]] = []
        self.lock = threading.Lock()

    def _report_uncut(self, groups: list[Group]) -> None:
        known = {c for g in self.report_uncut for c in g.cuts}
        self.report_uncut.extend(g for g in groups if not set(g.cuts) & known)

    def _variant(self, groups: list[Group], inputs: Sequence[Any], fake_extras: bool) -> Variant:
        if not groups:
            return Variant(self.compile_fn(self.deps.gm, list(inputs)), [])
        remainder = self.deps.remainder(groups)
        if fake_extras:
            extras = [fake(n) for n in remainder.graph.nodes if n.name.startswith("attnfx_cached_")]
        else:
            extras = [v for g in groups for v in _values(g, [inputs[i] for i in g.keys])]
        self.report_groups.extend(g for g in groups if g not in self.report_groups)
        return Variant(self.compile_fn(remainder, list(inputs) + extras), groups)

    def __call__(self, *args):
        if self.learning:
            self._learn(args)
        current = self.current  # read once: learning or another call may replace it
        if current is not self.base and any(g.varying for g in current.groups):
            log.info("attnfx: an input taken as stable changes at every call; back to the compile-time split")
            self.current = current = self.base
        return current(args)

    def _learn(self, args) -> None:
        seen = {i: tensor_key(args[i])[0] for i in self.deps.tensor_inputs - self.deps.params}
        with self.lock:  # one call decides and compiles; the others run the compile-time split meanwhile
            if not self.learning:
                return
            self.seen.append(seen)
            if len(self.seen) < self.LEARN_CALLS:
                return
            self.learning = False
        # stable: the same tensor each call, or a few alternating ones (CFG branches called one by one)
        stable = {i for i in self.seen[0] if len({s[i] for s in self.seen}) <= self.LEARN_CALLS // 2}
        stable |= self.deps.params
        self._report_uncut(self.deps.uncut(stable, "learned at run time"))
        known = {c for g in self.base.groups for c in g.cuts}
        groups = [g for g in self.deps.groups(stable, "learned at run time") if not set(g.cuts) & known]
        if not groups:
            return
        log.info("attnfx: %d group(s) of values read only stable inputs; compiling the graph that takes them",
                 len(groups))
        self.current = self._variant(self.base.groups + groups, args, fake_extras=False)
