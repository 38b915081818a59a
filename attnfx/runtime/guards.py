"""Graphs specialized on values passed in at run time, behind a check cached per distinct input tensor.

Some rewrites are exact only for the values the example call passed in: the rows HunyuanImage3's
``hidden.masked_select(image_mask)`` reads (``dead_tokens``), the structure of a mask given to the model
(``mask_structure``). A pattern may then specialize the graph on the example call's value and leave a
:class:`Guard`: which graph inputs the value is computed from (a small prefix graph) and a predicate the
value must satisfy for the specialized graph to stay exact. :class:`Guarded` runs the specialized graph
when every guard holds, and otherwise the graph rewritten without run-time specialization (compiled
alongside: data-dependent sizes need Dynamo's shape environment). A guard is evaluated once per distinct
input tensor — cached in an :class:`~attnfx.runtime.cache.InputCache` keyed on the identity and version
of its inputs — so a denoising loop that passes the same mask every step pays for it once (one host sync).
Guards whose inputs change on every call stop being checked, and the general graph runs from then on.

Concurrent calls: a guard's result comes from the cache, keyed on the call's own inputs; the counters
(``new_in_a_row``, the report's statistics) are updated under the guard's lock and only decide when to stop
checking — whichever graph then runs computes the same outputs.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from attnfx.runtime.cache import InputCache

log = logging.getLogger("attnfx")

CHECKS = InputCache(max_entries=1024, max_bytes=256 << 20)  # results are bools; bytes are copies of
# inference-mode inputs (see attnfx.runtime.cache)
STOP_CHECKING_AFTER = 4  # new values in a row after which the checks stop and the general graph runs
_uids = itertools.count()


@dataclass(eq=False)
class Guard:
    """A value computed from graph inputs that the specialized graph relies on."""

    what: str  # what the value is, for the report
    prefix: fx.GraphModule  # computes the value from graph inputs
    inputs: list[int]  # the positions of those inputs
    holds: Callable[[torch.Tensor], bool]  # whether the specialized graph is exact for a value
    expects: Any  # what ``holds`` checks, for the report
    key: Any = None  # guards with the same key are one guard (one mask read by every layer)
    sites: list = field(default_factory=list)  # the records of the sites that rely on it
    uid: int = field(default_factory=lambda: next(_uids))
    new_in_a_row: int = 0
    stats: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.stats.update({"what": self.what, "expects": self.expects, "checked": 0, "failed": 0})

    @property
    def varying(self) -> bool:
        """A different value on every recent call: checking costs a host sync each time, for nothing."""
        return self.new_in_a_row >= STOP_CHECKING_AFTER

    def check(self, args: Sequence[Any]) -> bool:
        tensors = [args[i] for i in self.inputs]
        computed = False

        def compute() -> bool:
            nonlocal computed
            computed = True
            with torch.no_grad():
                ok = bool(self.holds(self.prefix(*tensors)))
            with self.lock:
                self.stats["checked"] += 1
                self.stats["failed"] += not ok
            return ok

        ok = CHECKS.get_or_compute(("guard", self.uid), tensors, (), compute)
        with self.lock:
            self.new_in_a_row = self.new_in_a_row + 1 if computed else 0
        return ok


def add(guards: list[Guard], guard: Guard, record: Any) -> Guard:
    """Register ``guard`` for the site ``record`` (merged with an equal-keyed one already there)."""
    for g in guards:
        if guard.key is not None and g.key == guard.key:
            guard = g
            break
    else:
        guards.append(guard)
    if record is not None and all(r is not record for r in guard.sites):
        guard.sites.append(record)
    return guard


class Guarded:
    """Call ``specialized`` while every guard holds, else ``general``."""

    def __init__(self, specialized: Callable, general: Callable, guards: Sequence[Guard], graph_index: int):
        self.specialized, self.general, self.guards = specialized, general, list(guards)
        self.graph_index, self.gave_up, self.told = graph_index, False, False

    def __call__(self, *args: Any) -> Any:
        if not self.gave_up and all(g.check(args) for g in self.guards):
            return self.specialized(*args)
        if not self.gave_up and any(g.varying for g in self.guards):
            self.gave_up = True
            for g in self.guards:
                g.stats["stopped"] = "a new value on every call: the general graph runs from now on"
            log.info("attnfx: graph %d: the values passed in change on every call; no longer checked",
                     self.graph_index)
        if not self.told:
            self.told = True
            log.info("attnfx: graph %d: a value passed in differs from what the graph was specialized on; "
                     "running the graph compiled without run-time specialization", self.graph_index)
        return self.general(*args)
