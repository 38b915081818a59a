"""The one runtime cache of attnfx: results computed from graph inputs, reused while those inputs stay
the same tensors with the same contents.

A tensor input is identified by its storage (held by a *weak* reference: no memory is kept alive) plus
offset, shape, stride, dtype, device and ``_version`` (bumped by every in-place write through PyTorch).
Never by ``data_ptr`` alone: freed memory is reused by new tensors, which start at ``_version`` 0.
While an entry holds the weak reference, the storage object cannot be recycled for a new tensor, so
a recycled address is never mistaken for the old one; an entry whose storage died is dropped.

Tensors without a version counter — inference tensors, made under ``torch.inference_mode()`` — are
identified without a version, and the entry holds a copy of each: a hit is confirmed by comparing the
tensor with its copy, bit for bit (one device compare and host sync per hit), so an in-place edit inside
inference mode is seen. Entries whose copies would exceed :data:`MAX_COPY_BYTES` are not stored (the
value is computed on every call). This rule lives here alone; every user of the cache goes through it.

Only *real graph inputs* may be keys: Inductor reuses intermediate buffers without version bumps.

Not visible to the key (documented limits): writes through ``.data`` or ``.detach()``-ed aliases that
bypass version counting, and writes by foreign kernels (ctypes, custom CUDA code) into the memory.
:func:`clear_caches` empties every cache after such writes.

Every cache is bounded in entries and in bytes (values as their ``nbytes`` says, plus the copies); a value
larger than the byte bound is computed and not stored. Safe under concurrent calls: one lock per cache
guards its map, values are computed outside it (two threads missing the same key both compute it).

Used by the mask analysis (plans per distinct mask), the guards of specialized graphs and the per-step
invariant caching.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

MAX_COPY_BYTES = 64 << 20  # per entry: copies of tensors without a version counter, at most this many bytes

_generation = itertools.count(1)
_GENERATION = [0]  # bumped by clear_caches(): shortcuts that remember a previous result check it


def versioned(t: torch.Tensor) -> bool:
    """Whether in-place writes to ``t`` are counted (``_version``); inference tensors have no counter."""
    return not t.is_inference()


def tensor_key(t: torch.Tensor) -> tuple[tuple, StorageWeakRef]:
    """The identity of a graph input: storage, view, dtype, device and version (None: no version counter)."""
    ref = StorageWeakRef(t.untyped_storage())
    version = t._version if versioned(t) else None
    return (ref.cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, version), ref


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its width: equal bits, not equal values (NaN equals NaN, -0.0 is not 0.0)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype.is_floating_point:
        t = t.view(_INT_OF_SIZE[t.element_size()])
    return t


def same_contents(t: torch.Tensor, copy: torch.Tensor) -> bool:
    return torch.equal(_bits(t), _bits(copy))


def generation() -> int:
    """Changes with every :func:`clear_caches`: a shortcut remembering an earlier result must match it."""
    return _GENERATION[0]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    stale: int = 0
    changed: int = 0  # an unversioned input whose contents differ from the entry's copy
    not_stored: int = 0  # values computed and not stored: too large, or copies too large


@dataclass
class _Entry:
    value: Any
    refs: list = field(default_factory=list)
    nbytes: int = 0
    copies: tuple = ()  # (position among the key tensors, copy) of the tensors without a version counter
    stored: bool = True  # False once dropped from its cache

    def alive(self) -> bool:
        return not any(r.expired() for r in self.refs)

    def confirms(self, tensors: Sequence[torch.Tensor]) -> bool:
        return all(same_contents(tensors[i], c) for i, c in self.copies)


_ALL: "weakref.WeakSet[InputCache]" = weakref.WeakSet()


def clear_all() -> None:
    """Empty every input cache of the process and reset its statistics."""
    _GENERATION[0] = next(_generation)
    for cache in list(_ALL):
        cache.clear()
        cache.stats = CacheStats()


def clear_caches() -> None:
    """Forget every value attnfx computed from tensors at run time: mask plans, checks of specialized graphs,
    cached invariants. Call it after writing weights or inputs in a way PyTorch does not count — through
    ``.data`` (PEFT's LoRA merge, ``fuse_lora``) or by foreign kernels; values are recomputed on the next call."""
    clear_all()


class InputCache:
    """An LRU map from (namespace, graph-input identities, ints) to a computed value, bounded in entries and bytes."""

    RECENT = 1024  # namespaces whose last hit is remembered for the fast path

    def __init__(self, max_entries: int = 256, max_bytes: int = 256 << 20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        # namespace -> (signature, weak refs to the tensor objects, entry) of its last lookup: a call with the
        # same tensor objects at the same version finds its value without building a key (the common case: a
        # loop passing the same mask, the same text, every step)
        self._recent: dict[Hashable, tuple] = {}
        self._lock = threading.Lock()
        self.stats = CacheStats()
        self.nbytes = 0
        _ALL.add(self)

    @staticmethod
    def _signature(tensors: Sequence[torch.Tensor], ints: Sequence[Any]) -> tuple | None:
        if not all(versioned(t) for t in tensors):
            return None  # contents must be confirmed against a copy: the full lookup
        return (generation(), tuple((id(t), t._version, t.data_ptr(), t.shape) for t in tensors),
                tuple(int(i) for i in ints))

    def key(self, namespace: Hashable, tensors: Sequence[torch.Tensor], ints: Sequence[Any] = ()) -> tuple:
        parts, refs = [], []
        for t in tensors:
            k, r = tensor_key(t)
            parts.append(k)
            refs.append(r)
        return (namespace, tuple(parts), tuple(int(i) for i in ints)), refs

    def get_or_compute(self, namespace: Hashable, tensors: Sequence[torch.Tensor], ints: Sequence[Any],
                       compute: Callable[[], Any], nbytes: Callable[[Any], int] | None = None) -> Any:
        """The value for these inputs: the stored one, or ``compute()`` (stored if it fits the bounds)."""
        signature = self._signature(tensors, ints)
        recent = self._recent.get(namespace) if signature is not None else None  # read once: threads replace it
        if recent is not None and recent[0] == signature and all(r() is t for r, t in zip(recent[1], tensors)) \
                and recent[2].stored and recent[2].alive():
            self.stats.hits += 1
            return recent[2].value
        key, refs = self.key(namespace, tensors, ints)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and not entry.alive():
                self._drop(key)
                self.stats.stale += 1
                entry = None
        if entry is not None:
            if entry.confirms(tensors):  # outside the lock: a device compare where copies are held
                with self._lock:
                    if self._entries.get(key) is entry:
                        self._entries.move_to_end(key)
                    self.stats.hits += 1
                self._remember(namespace, signature, tensors, entry)
                return entry.value
            with self._lock:
                self.stats.changed += 1
        unversioned = [i for i, t in enumerate(tensors) if not versioned(t)]
        copy_bytes = sum(tensor_bytes(tensors[i]) for i in unversioned)
        store = copy_bytes <= MAX_COPY_BYTES
        # copies taken before computing: they hold the contents the value is computed from
        copies = tuple((i, tensors[i].detach().clone()) for i in unversioned) if store else ()
        value = compute()
        size = copy_bytes + (nbytes(value) if nbytes else 0)
        with self._lock:
            self.stats.misses += 1
            if not store or size > self.max_bytes:
                self.stats.not_stored += 1
                return value
            if key in self._entries:  # another thread stored it meanwhile, or its copies no longer match
                self._drop(key)
            entry = self._entries[key] = _Entry(value, refs, size, copies)
            self.nbytes += size
            self._evict()
        self._remember(namespace, signature, tensors, entry)
        return value

    def _remember(self, namespace: Hashable, signature: tuple | None, tensors: Sequence[torch.Tensor],
                  entry: _Entry) -> None:
        if signature is None:
            return
        if len(self._recent) >= self.RECENT:
            self._recent.clear()
        self._recent[namespace] = (signature, [weakref.ref(t) for t in tensors], entry)

    def _drop(self, key) -> None:
        entry = self._entries.pop(key)
        entry.stored = False
        self.nbytes -= entry.nbytes

    def _evict(self) -> None:
        for key in [k for k, e in self._entries.items() if not e.alive()]:
            self._drop(key)
            self.stats.stale += 1
        while self._entries and (len(self._entries) > self.max_entries or self.nbytes > self.max_bytes):
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1

    def clear(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                entry.stored = False
            self._entries.clear()
            self._recent.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)
