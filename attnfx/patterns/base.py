"""The pattern protocol: what a pattern declares, what it is given, and what it answers.

A pattern module declares one :class:`Pattern`:

    PATTERN = Pattern("gqa", rewrite, applies_to="sdpa", after=("manual_attention",))

``rewrite(site, ctx)`` is called for every site of the kind it applies to (``"sdpa"``: the site's node is an
SDPA call, its arguments one spelling — ``site.args()``; ``"manual"``: a hand-written softmax attention) and
answers in one of three ways:

* ``None``                the pattern does not apply here (nothing is recorded);
* ``raise Refused(why)``  it applies but must not rewrite: the site stays as it was, ``why`` is reported;
* an :class:`Outcome`     it rewrote the site: what the site now calls, what it saves, what to report.

``ctx`` is the :class:`PassContext`: the graph, the options (``ctx.options``), the real example inputs of the
call being compiled, and where guards on values passed in are registered. ``after``/``before`` name patterns
that must run earlier/later; the registry (``attnfx.patterns``) orders by them and fails at import on a
contradiction.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch.fx as fx

from attnfx.fx.graph import Refused, op_name
from attnfx.fx.sites import Site, SiteRecord
from attnfx.options import Options

__all__ = ["Outcome", "PassContext", "Pattern", "Refused", "Site", "SiteRecord", "order"]

KINDS = ("sdpa", "manual")
_uids = itertools.count()


@dataclass
class Outcome:
    """A rewrite that took effect at one site."""

    target: str | None = None  # what the site calls now (default: described from the new SDPA call)
    reason: str | None = None  # caveats worth reporting
    savings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    node: fx.Node | None = None  # the site's new attention node, when it changed
    output: fx.Node | None = None  # the site's new result node, when it changed
    replaced: list[fx.Node] = field(default_factory=list)  # old nodes that may now be dead


@dataclass
class PassContext:
    """What every pattern is given besides the site."""

    gm: fx.GraphModule
    options: Options
    graph_index: int
    example_inputs: Sequence[Any] | None = None  # the real inputs of the call being compiled
    layers: dict = field(default_factory=dict)  # site key -> layer index, shared by a backend's graphs
    guards: list = field(default_factory=list)  # attnfx.runtime.guards.Guard: what must hold at run time
    keepalive: list = field(default_factory=list)  # run-time state the compiled graph must keep alive
    uid: int = field(default_factory=lambda: next(_uids))  # unique in the process, unlike graph_index

    @property
    def specialize(self) -> bool:
        """Whether patterns may specialize the graph on values passed in (read from ``example_inputs``)."""
        return self.options.specialize and self.example_inputs is not None

    def layer_index(self, record: SiteRecord) -> int:
        """The attention site's index in the model, stable across recompilations (first seen, first numbered)."""
        key = record.key[:3]
        if key not in self.layers:
            self.layers[key] = len(self.layers)
        return self.layers[key]


@dataclass(frozen=True)
class Pattern:
    name: str
    rewrite: Callable[[Site, PassContext], Outcome | None]
    applies_to: str = "sdpa"  # "sdpa" | "manual"
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    enabled: Callable[[Options], bool] = lambda options: True  # e.g. only with an NPU target

    def __post_init__(self):
        if self.applies_to not in KINDS:
            raise ValueError(f"pattern {self.name}: applies_to must be one of {KINDS}, not {self.applies_to!r}")

    def applies(self, site: Site) -> bool:
        if self.applies_to == "sdpa":
            return op_name(site.node) == "sdpa"
        return site.kind == "manual" and op_name(site.node) == "softmax"


def order(patterns: Sequence[Pattern]) -> tuple[Pattern, ...]:
    """The patterns in an order that satisfies every ``after``/``before`` (listing order where free).
    Raises ValueError on an unknown name or a contradiction, so a bad registration fails at import."""
    by_name = {p.name: p for p in patterns}
    if len(by_name) != len(patterns):
        raise ValueError("two patterns share a name")
    must: dict[str, set[str]] = {p.name: set() for p in patterns}  # name -> names that must come first
    for p in patterns:
        for other in (*p.after, *p.before):
            if other not in by_name:
                raise ValueError(f"pattern {p.name}: unknown pattern {other!r} in after/before")
        must[p.name] |= set(p.after)
        for other in p.before:
            must[other].add(p.name)
    done: list[Pattern] = []
    left = list(patterns)
    while left:
        ready = next((p for p in left if must[p.name] <= {d.name for d in done}), None)
        if ready is None:
            raise ValueError(f"patterns {', '.join(p.name for p in left)}: after/before contradict each other")
        done.append(ready)
        left.remove(ready)
    return tuple(done)
