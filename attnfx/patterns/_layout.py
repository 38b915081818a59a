"""Index-movement algebra: what a chain of view/copy ops does to the dims of its source.

Ops such as ``x[:, :, None]``, ``expand``, ``repeat``, ``repeat_interleave``, ``reshape``/``view``,
``permute``/``transpose``, ``contiguous``/``clone`` never look at values: each output element is a
copy of one source element, chosen by index alone. We describe their result by a *layout*: for every
output dim, the ordered list of *atoms* it is made of (row-major), where an atom is either a source
dim (``Atom("src", d)``) or a broadcast repetition of everything inside it (``Atom("rep", size=n)``).

    x: (B, Hkv, S, D)                       -> [src0] [src1] [src2] [src3]
    x[:, :, None]                           -> [src0] [src1] [] [src2] [src3]
    .expand(B, Hkv, n, S, D)                -> [src0] [src1] [rep n] [src2] [src3]
    .reshape(B, Hkv*n, S, D)                -> [src0] [src1, rep n] [src2] [src3]

An output dim ``[src1, rep n]`` indexes element ``h = j*n + r`` with ``j`` the source index, so head
``h`` reads source head ``h // n``: grouped order. ``[rep n, src1]`` gives ``h = r*Hkv + j``, i.e.
``h % Hkv``: tiled order. Reasoning only with sizes that are *statically* equal (for every value of
the shape symbols), a layout proves the mapping for every shape the graph serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from attnfx.fx.graph import arg, fake, known_eq, known_one, op_name

@dataclass(frozen=True)
class Atom:
    kind: str  # "src" | "rep"
    size: Any  # int or SymInt
    dim: int = -1  # source dim, for kind == "src"

    def __repr__(self) -> str:
        return f"src{self.dim}" if self.kind == "src" else f"rep{self.size}"


Layout = tuple  # tuple[tuple[Atom, ...], ...]


class NotMovement(Exception):
    """The op is not a pure index movement we can describe."""


def identity_layout(t: torch.Tensor) -> Layout:
    return tuple((Atom("src", s, d),) for d, s in enumerate(t.shape))


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _sizes(args: Sequence[Any]) -> list[Any]:
    if len(args) == 1 and isinstance(args[0], (list, tuple, torch.Size)):
        args = args[0]
    return [fake(a) for a in args]


def _regroup(layout: Layout, out_shape: Sequence[Any]) -> Layout:
    """Row-major reshape: regroup the atoms into dims of the given sizes (merges only)."""
    flat = [a for dim in layout for a in dim if not known_one(a.size)]
    out, i = [], 0
    for size in out_shape:
        if known_one(size):
            out.append(())
            continue
        group, prod = [], 1
        while i < len(flat):
            group.append(flat[i])
            prod = prod * flat[i].size
            i += 1
            if known_eq(prod, size):
                break
        else:
            raise NotMovement("reshape splits a dim")
        out.append(tuple(group))
    if i != len(flat):
        raise NotMovement("reshape does not consume every dim")
    return tuple(out)


def step(node: fx.Node, layout: Layout) -> Layout:
    """The layout of ``node``'s output given the layout of its tensor operand (``node.args[0]``)."""
    src_t, out_t = fake(node.args[0]), fake(node)
    if not isinstance(out_t, torch.Tensor) or not isinstance(src_t, torch.Tensor):
        raise NotMovement("not a tensor op")
    rule = MOVEMENT_RULES.get(op_name(node))
    if rule is None:
        raise NotMovement(f"{op_name(node)} is not an index movement")
    return rule(node, layout, src_t, out_t)


def _same(node, layout, src_t, out_t) -> Layout:
    return layout


def _to(node, layout, src_t, out_t) -> Layout:
    if out_t.dtype != src_t.dtype or out_t.device != src_t.device:
        raise NotMovement("a real conversion")
    return layout


def _getitem(node, layout, src_t, out_t) -> Layout:
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for e in idx if e is not None and e is not Ellipsis)
    out, j = [], 0
    for e in idx:
        if e is None:
            out.append(())
        elif e is Ellipsis:
            for _ in range(src_t.dim() - n_real):
                out.append(layout[j])
                j += 1
        elif isinstance(e, slice) and e == slice(None, None, None):
            out.append(layout[j])
            j += 1
        else:
            raise NotMovement("indexing selects elements")
    return tuple(out) + tuple(layout[j:])


def _unsqueeze(node, layout, src_t, out_t) -> Layout:
    d = _norm(arg(node, 1, "dim"), src_t.dim() + 1)
    return layout[:d] + ((),) + layout[d:]


def _broadcast(node, layout, src_t, out_t) -> Layout:
    """``expand`` (size-1 dims broadcast) and ``repeat`` (tiles: the copy index is the outer one)."""
    repeat = op_name(node) == "repeat"
    reps = _sizes(node.args[1:]) if repeat else None
    lead = out_t.dim() - src_t.dim()
    out = []
    for d, size in enumerate(out_t.shape):
        if d < lead:
            out.append(() if known_one(size) else (Atom("rep", size),))
            continue
        atoms, src_size = layout[d - lead], src_t.shape[d - lead]
        if not repeat:
            if known_eq(size, src_size):
                out.append(atoms)
            elif known_one(src_size):
                out.append((Atom("rep", size),))
            else:
                raise NotMovement("expand of a non-singleton dim")
        elif known_one(reps[d]):
            out.append(atoms)
        elif known_one(src_size):
            out.append((Atom("rep", reps[d]),))
        else:
            out.append((Atom("rep", reps[d]),) + tuple(atoms))
    return tuple(out)


def _repeat_interleave(node, layout, src_t, out_t) -> Layout:
    repeats, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
    if dim is None or isinstance(fake(repeats), torch.Tensor):
        raise NotMovement("repeat_interleave over a flattened input or with per-element counts")
    d = _norm(dim, src_t.dim())
    out = list(layout)
    out[d] = tuple(layout[d]) + (Atom("rep", fake(repeats)),)
    return tuple(out)


def _reshape(node, layout, src_t, out_t) -> Layout:
    return _regroup(layout, list(out_t.shape))


def _permute(node, layout, src_t, out_t) -> Layout:
    return tuple(layout[_norm(d, src_t.dim())] for d in _sizes(node.args[1:]))


def _transpose(node, layout, src_t, out_t) -> Layout:
    a, b = _norm(arg(node, 1, "dim0"), src_t.dim()), _norm(arg(node, 2, "dim1"), src_t.dim())
    out = list(layout)
    out[a], out[b] = out[b], out[a]
    return tuple(out)


# one rule per movement op (by normalised op name): adding an op is one entry
MOVEMENT_RULES: dict[str, Callable[..., Layout]] = {
    "contiguous": _same, "clone": _same, "to": _to, "getitem": _getitem, "unsqueeze": _unsqueeze,
    "expand": _broadcast, "repeat": _broadcast, "repeat_interleave": _repeat_interleave,
    "reshape": _reshape, "flatten": _reshape, "permute": _permute, "transpose": _transpose,
}
MOVEMENT_OPS = frozenset(MOVEMENT_RULES)


def trace(node: fx.Node, max_depth: int = 12) -> list[tuple[fx.Node, Layout, list[fx.Node]]]:
    """Every way to read ``node`` as a movement chain applied to an earlier node.

    Returns ``(source, layout, chain)`` triples, nearest source first; ``chain`` lists the movement
    nodes between source (exclusive) and ``node`` (inclusive).
    """
    chain: list[fx.Node] = []
    cur = node
    while (op_name(cur) in MOVEMENT_OPS and cur.args and isinstance(cur.args[0], fx.Node)
           and isinstance(fake(cur.args[0]), torch.Tensor) and len(chain) < max_depth):
        chain.append(cur)
        cur = cur.args[0]
    chain.reverse()  # source-most first
    found = []
    for start in range(len(chain) - 1, -1, -1):
        source = chain[start].args[0]
        layout = identity_layout(fake(source))
        try:
            for n in chain[start:]:
                layout = step(n, layout)
        except NotMovement:
            continue
        found.append((source, layout, chain[start:]))
    return found
