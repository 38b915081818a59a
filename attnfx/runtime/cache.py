"""The one runtime cache of attnfx: results computed from graph inputs, reused while those inputs stay
the same tensors with the same contents.

A tensor input is identified by its storage (held by a *weak* reference: no memory is kept alive) plus
offset, shape, stride, dtype, device and ``_version`` (bumped by every in-place write through PyTorch).
Never by ``data_ptr`` alone: freed memory is reused by new tensors, which start at ``_version`` 0.
While an entry holds the weak reference, the storage object cannot be recycled for a new tensor, so
a recycled address is never mistaken for the old one; an entry whose storage died is dropped.

Only *real graph inputs* may be keys: Inductor reuses intermediate buffers without version bumps.

Not visible to the key (documented limits): writes through ``.data`` or ``.detach()``-ed aliases that
bypass version counting, and writes by foreign kernels (ctypes, custom CUDA code) into the memory.

Used by the mask analysis (plans per distinct mask) and the per-step invariant caching.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef


def tensor_key(t: torch.Tensor) -> tuple[tuple, StorageWeakRef]:
    ref = StorageWeakRef(t.untyped_storage())
    return (ref.cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version), ref


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    stale: int = 0


@dataclass
class _Entry:
    value: Any
    refs: list = field(default_factory=list)
    nbytes: int = 0

    def alive(self) -> bool:
        return not any(r.expired() for r in self.refs)


_ALL: "weakref.WeakSet[InputCache]" = weakref.WeakSet()


def clear_all() -> None:
    """Empty every input cache of the process and reset its statistics."""
    for cache in list(_ALL):
        cache.clear()
        cache.stats = CacheStats()


class InputCache:
    """An LRU map from (namespace, graph-input identities, ints) to a computed value, bounded in entries and bytes."""

    def __init__(self, max_entries: int = 256, max_bytes: int | None = None):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()
        self.nbytes = 0
        _ALL.add(self)

    def key(self, namespace: Hashable, tensors: Sequence[torch.Tensor], ints: Sequence[Any] = ()) -> tuple:
        parts, refs = [], []
        for t in tensors:
            k, r = tensor_key(t)
            parts.append(k)
            refs.append(r)
        return (namespace, tuple(parts), tuple(int(i) for i in ints)), refs

    def get_or_compute(self, namespace: Hashable, tensors: Sequence[torch.Tensor], ints: Sequence[Any],
                       compute: Callable[[], Any], nbytes: Callable[[Any], int] | None = None) -> Any:
        key, refs = self.key(namespace, tensors, ints)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if entry.alive():
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    return entry.value
                self._drop(key)
                self.stats.stale += 1
        value = compute()
        size = nbytes(value) if nbytes else 0
        with self._lock:
            self.stats.misses += 1
            self._entries[key] = _Entry(value, refs, size)
            self.nbytes += size
            self._evict()
        return value

    def _drop(self, key) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes

    def _evict(self) -> None:
        for key in [k for k, e in self._entries.items() if not e.alive()]:
            self._drop(key)
            self.stats.stale += 1
        while len(self._entries) > self.max_entries or (
                self.max_bytes is not None and self.nbytes > self.max_bytes and len(self._entries) > 1):
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)
