"""What attnfx did, per attention site: records written by the passes, and the report built from them.

A :class:`~attnfx.fx.sites.SiteRecord` is created when a site is found and is then filled by each pattern that
looks at it (matched or not, rewritten or refused, why, what it saves). The :class:`Report` is only
a collection of those records: it never walks a graph itself.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from attnfx._version import __version__
from attnfx.fx.sites import SiteRecord


class Report:
    """The rewrite report of an optimized model (or of every graph the ``attnfx`` backend compiled).

    Sites are keyed by (module, source, occurrence, query shape): graphs compiled for other shapes are
    live code too and are listed apiece; a recompilation for the same shapes (train/eval switch)
    replaces the records of the sites it covers.
    """

    def __init__(self) -> None:
        self._sites: dict[tuple, SiteRecord] = {}
        self.graphs = 0
        self.verified: bool | None = None
        self.cached: list = []  # attnfx.runtime.invariants.Group: values computed once per distinct input
        # what Dynamo did with the model on its first call: compiled or not (why), graph breaks (why)
        self.dynamo: dict[str, Any] = {}
        self.not_cached: list = []  # groups kept uncut, each with why (values that read parameters)

    def add_graph(self, records: list[SiteRecord]) -> None:
        self.graphs += 1
        for rec in records:
            self._sites[rec.key] = rec

    @property
    def sites(self) -> list[SiteRecord]:
        return list(self._sites.values())

    def __len__(self) -> int:
        return len(self._sites)

    def __iter__(self):
        return iter(self.sites)

    def summary(self) -> dict[str, Any]:
        sites = self.sites
        saved: dict[str, Any] = {}
        for s in sites:
            for k, v in s.savings.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    saved[k] = saved.get(k, 0) + v
        return {
            "sites": len(sites),
            "rewritten": sum(s.rewritten for s in sites),
            "graphs": self.graphs,
            "savings": saved,
            "cached_groups": len(self.cached),
            "cached_bytes": sum(g.nbytes for g in self.cached),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "attnfx": __version__,
            "torch": torch.__version__,
            "summary": self.summary(),
            "verified": self.verified,
            "dynamo": dict(self.dynamo),
            "sites": [s.to_dict() for s in self.sites],
            "cached": [g.describe() for g in self.cached],
            "not_cached": [g.describe() for g in self.not_cached],
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        sites = self.sites
        if self.dynamo.get("compiled") is False:
            return f"attnfx: Dynamo ran the model without compiling it ({self.dynamo.get('why')}); nothing was rewritten"
        if not sites:
            return "attnfx: no attention sites found (has the model been called once since optimize()?)"
        rows = [("#", "module", "source", "shape", "patterns", "rewritten", "target", "mask", "saves", "reason")]
        for i, s in enumerate(sites):
            pats = ",".join(p if p in s.applied else f"{p}(refused)" for p in s.patterns) or "-"
            rows.append((
                str(i), s.module, s.source, str(s.details.get("shape", "-")), pats, "yes" if s.rewritten else "no",
                s.target or "-", _fmt_mask(s.details.get("mask")), _fmt_savings(s.savings), s.reason or "-",
            ))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
        lines = []
        for r in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1])
        summ = self.summary()
        tail = f"{summ['rewritten']}/{summ['sites']} attention sites rewritten in {summ['graphs']} graph(s)"
        if summ["savings"]:
            tail += "; per call: " + _fmt_savings(summ["savings"])
        if self.verified:
            tail += "; verified against the original"
        out = lines + ["", tail]
        for b in self.dynamo.get("graph_breaks", []):
            out.append(f"graph break ({b['count']}x): {b['reason']}")
        if self.cached:
            out += ["", f"cached invariants ({len(self.cached)} group(s), {_fmt_bytes(summ['cached_bytes'])} held):"]
            for g in self.cached:
                d = g.describe()
                out.append(f"  {d['computes']}  [{d['found']}; {d['ops_saved_per_hit']} ops saved per hit; "
                           f"computed {d['computed']}x, reused {d['hits']}x]")
        if self.not_cached:
            out += ["", f"not cached, computed every call ({len(self.not_cached)} group(s)):"]
            for g in self.not_cached:
                d = g.describe()
                out.append(f"  {d['computes']}  [{d['found']}; {d['why']}]")
        return "\n".join(out)

    def __repr__(self) -> str:
        s = self.summary()
        return f"<attnfx.Report {s['rewritten']}/{s['sites']} sites rewritten>"


def _fmt_mask(mask: dict | None) -> str:
    if not mask:
        return "-"
    kind = mask.get("kind", "?")
    n = len(mask.get("groups", mask.get("q_seqlens", mask.get("lengths", []))))
    text = f"{kind}({n})" if n else kind
    if "kernel" in mask:
        text += f"->{mask['kernel']}"
    return f"{text} [{mask.get('analysis', '?')}]"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _fmt_savings(savings: dict[str, Any]) -> str:
    parts = []
    for k, v in savings.items():
        if not v:
            continue
        if k.endswith("_bytes") and isinstance(v, (int, float)):
            parts.append(f"{k[:-6]} {_fmt_bytes(v)}")
        elif k.endswith("_flops") and isinstance(v, (int, float)):
            parts.append(f"{k[:-6]} {_fmt_flops(v)}")
        else:
            parts.append(f"{k} {v}")
    return ", ".join(parts) or "-"


def _fmt_flops(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f} FLOP" if not unit else f"{n:.1f} {unit}FLOP"
        n /= 1000
    return str(n)  # pragma: no cover
