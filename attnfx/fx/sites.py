"""Attention sites: where a captured graph computes attention, and the record of what was done there.

Two kinds of site are found:
  * ``sdpa``   — a call of ``F.scaled_dot_product_attention``;
  * ``manual`` — ``softmax(scores) @ v`` written out by hand: a softmax whose probabilities reach the
    left operand of a matmul (through casts, dropout and views).
Every site is reported, rewritten or not: a :class:`SiteRecord` is created when the site is found and is
then filled by each pattern that looks at it. The report is a collection of those records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from attnfx.fx.graph import module_of, op_name, sdpa_args, set_sdpa_args, source_of

# ops that may sit between a softmax and the matmul that applies its probabilities: casts, dropout (the
# identity in eval) and views that keep the key axis last (Bloom: softmax -> dropout -> view -> bmm); and
# slicing, which makes it a site we must refuse (attention sinks)
PROB_IDENTITIES = frozenset({"to", "float", "half", "bfloat16", "type", "type_as", "dropout", "contiguous"})
PROB_VIEWS = frozenset({"reshape", "flatten", "unflatten"})
PROB_PASSTHROUGH = PROB_IDENTITIES | PROB_VIEWS | {"getitem"}


@dataclass
class SiteRecord:
    """What happened at one attention site: found, matched by which patterns, rewritten or refused and why."""

    module: str
    source: str
    graph: int  # which captured graph (0, 1, ... in compile order)
    index: int  # position of the site within its graph
    kind: str  # "sdpa" | "manual"
    patterns: list[str] = field(default_factory=list)  # every pattern that matched (applied or refused)
    applied: list[str] = field(default_factory=list)  # those whose rewrite took effect
    rewritten: bool = False
    target: str = ""
    reasons: list[str] = field(default_factory=list)
    savings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    @property
    def key(self) -> tuple:
        return (self.module, self.source, self.details.get("occurrence", 0), self.details.get("shape"))

    def matched(self, pattern: str, *, rewritten: bool, reason: str | None = None, target: str | None = None,
                savings: dict[str, Any] | None = None, **details: Any) -> None:
        """Record one pattern's outcome at this site."""
        if pattern not in self.patterns:
            self.patterns.append(pattern)
        if rewritten:
            self.rewritten = True
            self.applied.append(pattern)
        if target:
            self.target = target
        if reason:
            self.reasons.append(f"{pattern}: {reason}")
        for k, v in (savings or {}).items():
            self.savings[k] = self.savings.get(k, 0) + v if isinstance(v, (int, float)) else v
        self.details.update(details)

    def note(self, reason: str) -> None:
        self.reasons.append(reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "source": self.source,
            "graph": self.graph,
            "index": self.index,
            "kind": self.kind,
            "patterns": list(self.patterns),
            "applied": list(self.applied),
            "rewritten": self.rewritten,
            "target": self.target,
            "reason": self.reason,
            "savings": jsonable(self.savings),
            **{k: jsonable(v) for k, v in self.details.items() if k != "occurrence"},
        }


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return str(x)


@dataclass
class Site:
    node: fx.Node  # the attention call: the SDPA node, or the softmax of a manual attention
    record: SiteRecord
    output: fx.Node | None = None  # the node holding the site's result (for verification)
    original_output: str = ""  # that node's name in the graph as captured

    @property
    def kind(self) -> str:
        return self.record.kind

    def args(self) -> dict[str, Any]:
        """The arguments of the site's SDPA call by name, defaults filled in."""
        return sdpa_args(self.node)


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
            if name == "matmul" and u.args and u.args[0] is n:
                return u
            if name in PROB_PASSTHROUGH and u.args and u.args[0] is n:
                frontier.append(u)
    return None


def _shape(node) -> str:
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return "x".join(str(d) for d in val.shape) if hasattr(val, "shape") else "?"


def find_sites(gm: fx.GraphModule, graph_index: int, module_names: dict[int, str] | None = None) -> list[Site]:
    """Every attention site of ``gm``, in graph order, each with a fresh record. SDPA calls are respelled
    with q, k, v positional and the rest by keyword (the same call), so patterns read one spelling.
    ``module_names`` (``id(module)`` -> name in the model) names each site's module (``module_of``)."""
    sites: list[Site] = []
    occurrences: dict[tuple[str, str], int] = {}
    for node in gm.graph.nodes:
        name = op_name(node)
        if name == "sdpa":
            set_sdpa_args(node, sdpa_args(node))
            kind, output = "sdpa", node
        elif name == "softmax" and prob_matmul(node) is not None:
            kind, output = "manual", prob_matmul(node)
        else:
            continue
        module, source = module_of(node, module_names), source_of(output)
        occ = occurrences.get((module, source), 0)
        occurrences[(module, source)] = occ + 1
        record = SiteRecord(module=module, source=source, graph=graph_index, index=len(sites), kind=kind)
        query = node.args[0] if kind == "sdpa" else output
        record.details["shape"] = _shape(query)
        if occ:
            record.details["occurrence"] = occ
        sites.append(Site(node=node, record=record, output=output, original_output=output.name))
    return sites
