"""The pass manager: find the attention sites of a captured graph, run the patterns over them in the
registry's order, clean up what they left unused, and return the sites with their records."""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx

from attnfx.backends.sdpa import describe_call
from attnfx.fx.graph import Refused, erase_unused, op_name
from attnfx.fx.sites import Site, find_sites
from attnfx.options import Options
from attnfx.patterns import ORDER
from attnfx.patterns.base import PassContext


def run_passes(gm: fx.GraphModule, options: Options, graph_index: int = 0, layers: dict | None = None,
               example_inputs: Sequence[Any] | None = None, guards: list | None = None,
               keepalive: list | None = None, module_names: dict[int, str] | None = None) -> list[Site]:
    """Rewrite ``gm`` in place. Returns every attention site found, each with its record.

    With ``example_inputs`` (the real values of the call being compiled) a pattern may specialize the graph
    on values passed in (``options.specialize``); what must then hold at run time is appended to ``guards``.
    Run-time state the rewritten graph's ops reach is appended to ``keepalive``: the caller keeps it alive
    as long as the compiled graph.
    """
    ctx = PassContext(gm, options, graph_index, example_inputs=example_inputs,
                      layers=layers if layers is not None else {},
                      keepalive=keepalive if keepalive is not None else [])
    sites = find_sites(gm, graph_index, module_names)
    for pattern in ORDER:
        if pattern.name not in options.patterns or not pattern.enabled(options):
            continue
        for site in sites:
            if not pattern.applies(site):
                continue
            try:
                outcome = pattern.rewrite(site, ctx)
            except Refused as refusal:
                site.record.matched(pattern.name, rewritten=False, reason=refusal.reason, **refusal.details)
                continue
            if outcome is None:
                continue
            site.record.matched(pattern.name, rewritten=True, reason=outcome.reason, target=outcome.target,
                                savings=outcome.savings, **outcome.details)
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
