"""Graphs specialized on index sets passed in at run time, behind a check cached per distinct index tensor.

``dead_tokens`` may find the rows a model reads through an index set the caller passes in — HunyuanImage3's
``hidden.masked_select(image_mask)`` with ``image_mask`` a model input. Rows outside what the example
call's index set reads are dropped, which is exact for every later call whose index set reads within
the same rows. :class:`Guarded` runs the specialized graph when every such index set (recomputed from the
graph inputs it depends on) reads inside its rows, and otherwise the graph rewritten without run-time
specialization (compiled alongside: data-dependent sizes need Dynamo's shape environment). The check is cached in an
:class:`~attnfx.runtime.cache.InputCache` keyed on the identity and version of those inputs, so a
denoising loop that passes the same mask tensor every step pays for it once (one host sync).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Sequence

import torch

from attnfx.runtime.cache import InputCache

log = logging.getLogger("attnfx")

CHECKS = InputCache(max_entries=1024)
VARYING_AFTER = 4  # new index sets in a row after which the checks stop and the general graph runs
_uids = itertools.count()


class Check:
    """One run-time index set a graph was specialized on (see ``attnfx.patterns.dead_tokens.Guard``)."""

    def __init__(self, guard: Any):
        self.guard, self.uid, self.new_in_a_row = guard, next(_uids), 0
        self.stats = {"what": guard.what, "rows": [guard.lo, guard.hi], "index_sets_seen": 0, "outside": 0}

    @property
    def varying(self) -> bool:
        """A different index set on every recent call: checking costs a host sync each time, for nothing."""
        return self.new_in_a_row >= VARYING_AFTER

    def holds(self, args: Sequence[Any]) -> bool:
        tensors = [args[i] for i in self.guard.inputs]
        computed = False

        def compute() -> bool:
            nonlocal computed
            computed = True
            return self._check(tensors)

        inside = CHECKS.get_or_compute(("index-set", self.uid), tensors, (), compute)
        self.new_in_a_row = self.new_in_a_row + 1 if computed else 0
        return inside

    def _check(self, tensors: list[torch.Tensor]) -> bool:
        with torch.no_grad():
            lo, hi = self.guard.rows(self.guard.prefix(*tensors))
        inside = lo >= hi or (self.guard.lo <= lo and hi <= self.guard.hi)
        self.stats["index_sets_seen"] += 1
        self.stats["outside"] += not inside
        return inside


class Guarded:
    """Call ``specialized`` while every check holds, else ``general``."""

    def __init__(self, specialized: Callable, general: Callable, checks: Sequence[Check], graph_index: int):
        self.specialized, self.general, self.checks = specialized, general, list(checks)
        self.graph_index, self.gave_up, self.told = graph_index, False, False

    def __call__(self, *args: Any) -> Any:
        if not self.gave_up and all(c.holds(args) for c in self.checks):
            return self.specialized(*args)
        if not self.gave_up and any(c.varying for c in self.checks):
            self.gave_up = True
            for c in self.checks:
                c.stats["stopped"] = "a new index set on every call: the general graph runs from now on"
            log.info("attnfx: graph %d: the index sets passed in change on every call; no longer checked",
                     self.graph_index)
        if not self.told:
            self.told = True
            log.info("attnfx: graph %d: an index set passed in reads rows the specialized graph dropped; "
                     "running the graph compiled without run-time specialization", self.graph_index)
        return self.general(*args)
