"""Attention sites: where a captured graph computes attention, and what a pattern says about one.

Two kinds of site are found:
  * ``sdpa``   — a call of ``F.scaled_dot_product_attention``;
  * ``manual`` — ``softmax(scores) @ v`` written out by hand: a softmax whose probabilities reach the
    left operand of a matmul (through casts and dropout).
Every site is reported, rewritten or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from attnfx.rewriter.graph import module_of, op_name, sdpa_args, source_of
from attnfx.rewriter.report import SiteRecord

# ops that may sit between a softmax and the matmul that applies its probabilities: casts and dropout
# (the identity in eval), and slicing, which makes it a site we must refuse (attention sinks)
PROB_IDENTITIES = frozenset({"to", "float", "half", "bfloat16", "type", "type_as", "dropout", "contiguous"})
PROB_PASSTHROUGH = PROB_IDENTITIES | {"getitem"}


@dataclass
class Site:
    node: fx.Node  # the attention call: the SDPA node, or the softmax of a manual attention
    record: SiteRecord
    output: fx.Node | None = None  # the node holding the site's result (for verification)
    original_output: str = ""  # that node's name in the graph as captured

    @property
    def kind(self) -> str:
        return self.record.kind


@dataclass
class Outcome:
    """One pattern's verdict on one site. Patterns return ``None`` when they do not apply at all."""

    rewritten: bool
    reason: str | None = None
    target: str | None = None
    savings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    node: fx.Node | None = None  # the site's new attention node, when it changed
    output: fx.Node | None = None  # the site's new result node, when it changed
    replaced: list[fx.Node] = field(default_factory=list)  # old nodes that may now be dead

    @classmethod
    def refuse(cls, reason: str, **details: Any) -> "Outcome":
        return cls(rewritten=False, reason=reason, details=details)


def prob_matmul(softmax: fx.Node) -> fx.Node | None:
    """The matmul that applies a softmax's probabilities as its left operand, if any."""
    frontier, seen = [softmax], set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            name = op_name(u)
            if name == "matmul" and u.args[0] is n:
                return u
            if name in PROB_PASSTHROUGH:
                frontier.append(u)
    return None


def _shape(node) -> str:
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return "x".join(str(d) for d in val.shape) if hasattr(val, "shape") else "?"


def find_sites(gm: fx.GraphModule, graph_index: int) -> list[Site]:
    sites: list[Site] = []
    occurrences: dict[tuple[str, str], int] = {}
    for node in gm.graph.nodes:
        name = op_name(node)
        if name == "sdpa":
            kind, output = "sdpa", node
        elif name == "softmax" and prob_matmul(node) is not None:
            kind, output = "manual", prob_matmul(node)
        else:
            continue
        module, source = module_of(node), source_of(output)
        occ = occurrences.get((module, source), 0)
        occurrences[(module, source)] = occ + 1
        record = SiteRecord(module=module, source=source, graph=graph_index, index=len(sites), kind=kind)
        query = sdpa_args(node)["query"] if kind == "sdpa" else output
        record.details["shape"] = _shape(query)
        if occ:
            record.details["occurrence"] = occ
        sites.append(Site(node=node, record=record, output=output, original_output=output.name))
    return sites
