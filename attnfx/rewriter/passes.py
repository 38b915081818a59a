"""The pass manager: find the attention sites of a captured graph, run the patterns over them in
order, clean up what they left unused, and return the sites with their records."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.fx as fx

from attnfx.backends.sdpa import describe_call
from attnfx.patterns import ORDER
from attnfx.rewriter.graph import RewriteError, erase_unused, op_name
from attnfx.rewriter.options import Options
from attnfx.rewriter.site import Outcome, Site, find_sites


_uids = itertools.count()


@dataclass
class PassContext:
    gm: fx.GraphModule
    options: Options
    graph_index: int
    uid: int = field(default_factory=lambda: next(_uids))  # unique in the process, unlike graph_index
    layers: dict = field(default_factory=dict)  # site key -> layer index, shared by a backend's graphs
    example_inputs: Sequence[Any] | None = None  # real values: patterns may specialize on run-time index sets
    guards: list = field(default_factory=list)  # ... and then say here what must be checked at run time

    def layer_index(self, record) -> int:
        """The attention site's index in the model, stable across recompilations (first seen, first numbered)."""
        key = record.key[:3]
        if key not in self.layers:
            self.layers[key] = len(self.layers)
        return self.layers[key]


def run_passes(gm: fx.GraphModule, options: Options, graph_index: int = 0, layers: dict | None = None,
               example_inputs: Sequence[Any] | None = None, guards: list | None = None) -> list[Site]:
    """Rewrite ``gm`` in place. Returns every attention site found, each with its record.

    With ``example_inputs`` (the real values of the call being compiled) a pattern may specialize the graph
    on index sets passed in at run time; what must then hold at run time is appended to ``guards``.
    """
    ctx = PassContext(gm, options, graph_index, layers=layers if layers is not None else {},
                      example_inputs=example_inputs)
    sites = find_sites(gm, graph_index)
    for pattern in ORDER:
        if pattern.NAME not in options.patterns:
            continue
        for site in sites:
            try:
                outcome = pattern.rewrite(site, ctx)
            except RewriteError as exc:
                outcome = Outcome.refuse(f"rewrite could not be built ({exc})")
            if outcome is None:
                continue
            site.record.matched(pattern.NAME, rewritten=outcome.rewritten, reason=outcome.reason,
                                target=outcome.target, savings=outcome.savings, **outcome.details)
            if outcome.node is not None:
                site.node = outcome.node
            if outcome.output is not None:
                site.output = outcome.output
            erase_unused(outcome.replaced)
    for site in sites:
        rec = site.record
        if not rec.rewritten:
            rec.target = "unchanged: " + ("F.scaled_dot_product_attention" if rec.kind == "sdpa" else "softmax(q @ kᵀ) @ v")
        elif op_name(site.node) == "sdpa":
            rec.target = describe_call(site.node)
        if not rec.patterns:
            rec.note("no pattern applies")
    gm.graph.lint()
    gm.recompile()
    if guards is not None:
        guards.extend(ctx.guards)
    return sites
