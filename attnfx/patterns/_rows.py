"""Row-wise ops: which axis of each input carries the rows of an op's output, and computing only a range of them.

An op is *row-wise along* output axis ``o`` when row ``r`` of the output (the slice at index ``r`` of
``o``) is computed from row ``r`` of some inputs (along their own axis, of the same length) and from the
whole of the others (inputs that broadcast along ``o``, weights). For such an op, rows [lo, hi) of the
output are exactly the op applied to rows [lo, hi) of the row-carrying inputs — the fact both
propagations below rest on:

* :func:`narrowed` (upstream): ``x.narrow(axis, lo, n)`` computed by narrowing the inputs of the row-wise
  ops that only it reads (projections, RoPE with per-token tables, norms, reshapes), so rows nobody
  needs are never computed;
* :func:`sink` (downstream): users of an op computed on rows [lo, hi) only are computed on those rows too,
  down to the selectors that read them (slices, ``masked_select``, ``index_select``); where something
  cannot follow, the rows are padded back to full size (the padding is, by the caller's liveness proof,
  never read).

The op table is ``ROW_RULES`` behind :func:`input_axes`; everything else goes through it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from attnfx.fx.graph import (aliases_input, alias_root, arg, call_name, emit, fake, is_pure, known_eq,
                                   written_roots)

def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if isinstance(fake(n), torch.Tensor)]


def _dims(d: Any, nd: int) -> list[int] | None:
    if d is None:
        return None
    d = [d] if isinstance(d, int) else list(d)
    return [x % nd for x in d] if all(isinstance(x, int) for x in d) else None


def _prod(xs) -> Any:
    p = 1
    for x in xs:
        p = p * x
    return p


Axes = dict  # tensor input -> the axis carrying the rows, or None (read whole)


@dataclass
class _Op:
    """A single-tensor-valued call seen from its output axis ``o``: what each rule below looks at."""

    node: fx.Node
    o: int
    out: torch.Tensor
    ins: list[fx.Node]  # tensor inputs

    @property
    def nd(self) -> int:
        return self.out.dim()

    @property
    def length(self) -> Any:
        return self.out.shape[self.o]

    @property
    def x(self) -> fx.Node | None:
        """The tensor operand (the first positional argument), if it is one of the tensor inputs."""
        a = self.node.args[0] if self.node.args else None
        return a if isinstance(a, fx.Node) and a in self.ins else None

    def same(self, axis: int) -> Axes | None:
        """Rows along ``axis`` of the operand, the other inputs read whole."""
        x = self.x
        xt = fake(x)
        if 0 <= axis < xt.dim() and known_eq(xt.shape[axis], self.length):
            return {**{n: None for n in self.ins if n is not x}, x: axis}
        return None

    def same_rank(self) -> bool:
        return fake(self.x).dim() == self.nd


def input_axes(node: fx.Node, o: int) -> Axes | None:
    """If ``node`` is row-wise along its output axis ``o``: for each tensor input, the axis that carries the
    rows (``None``: the input is read whole, e.g. it broadcasts along ``o`` or is a weight). Else None.
    One rule per op (``ROW_RULES``); an op without a rule is not row-wise."""
    if node.op not in ("call_function", "call_method") or not is_pure(node):
        return None
    out = fake(node)
    if isinstance(out, (tuple, list)):
        return _split_axes(node, o)
    if not isinstance(out, torch.Tensor) or not 0 <= o < out.dim():
        return None
    name = call_name(node)
    if name == "getitem" and node.args and isinstance(fake(node.args[0]), (tuple, list)):
        return _piece(node, o)
    rule = ROW_RULES.get(name)
    if rule is None:
        return None
    op = _Op(node, o, out, _tensor_inputs(node))
    if name not in ("stack", "cat") and op.x is None:
        return None  # the tensor operand is not the first argument (or is passed by keyword): not followed
    return rule(op)


def _piece(node: fx.Node, o: int) -> Axes | None:
    """One piece of a split/chunk/unbind: rows along the split's input axis."""
    src = node.args[0]
    if not isinstance(node.args[1], int):
        return None
    d = _split_dim(src)
    return None if d is None else {src: o + 1 if call_name(src) == "unbind" and o >= d else o}


def _stack(op: _Op) -> Axes | None:
    d = arg(op.node, 1, "dim", 0) % op.nd
    parts = arg(op.node, 0, "tensors")
    if d == op.o or not all(isinstance(p, fx.Node) and isinstance(fake(p), torch.Tensor) for p in parts):
        return None
    return {p: op.o - (op.o > d) for p in parts}


def _cat(op: _Op) -> Axes | None:
    dim = arg(op.node, 1, "dim", 0) % op.nd
    parts = arg(op.node, 0, "tensors")
    if dim == op.o or not all(isinstance(p, fx.Node) and fake(p).dim() == op.nd
                              and known_eq(fake(p).shape[op.o], op.length) for p in parts):
        return None
    return {p: op.o for p in parts}


def _dropout(op: _Op) -> Axes | None:
    if arg(op.node, 2, "training", arg(op.node, 2, "train", True)) is not False:
        return None  # active dropout draws per element
    return op.same(op.o) if op.same_rank() else None


def _unary(op: _Op) -> Axes | None:
    return op.same(op.o) if op.same_rank() else None


def _softmax(op: _Op) -> Axes | None:
    if _dims(arg(op.node, 1, "dim"), op.nd) in (None, [op.o]):
        return None  # normalises over the rows
    return _unary(op)


def _elementwise(op: _Op) -> Axes | None:
    axes: Axes = {}
    for n in op.ins:
        t = fake(n)
        a = op.o - (op.nd - t.dim())
        if a < 0 or (known_eq(t.shape[a], 1) and not known_eq(op.length, 1)):
            axes[n] = None  # broadcast along the rows
        elif known_eq(t.shape[a], op.length):
            axes[n] = a
        else:
            return None
    return axes


def _linear(op: _Op) -> Axes | None:
    if op.o >= op.nd - 1 or not op.same_rank():
        return None
    return op.same(op.o)


def _matmul(op: _Op) -> Axes | None:
    """x @ W with a 2-D weight: a linear layer."""
    if len(op.ins) != 2 or fake(op.ins[1]).dim() != 2 or fake(op.x).dim() < 2:
        return None
    return _linear(op)


def _norm(op: _Op) -> Axes | None:
    """layer_norm / rms_norm normalise over the last len(normalized_shape) dims."""
    shape = arg(op.node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    return op.same(op.o) if op.o < op.nd - k else None


def _reduction(op: _Op) -> Axes | None:
    xt = fake(op.x)
    dims = _dims(arg(op.node, 1, "dim"), xt.dim())
    if not dims:
        return None
    if arg(op.node, 2, "keepdim", False):
        return op.same(op.o) if op.o not in dims else None
    kept = [d for d in range(xt.dim()) if d not in dims]
    return op.same(kept[op.o]) if op.o < len(kept) else None


def _transpose(op: _Op) -> Axes | None:
    a, b = arg(op.node, 1, "dim0") % op.nd, arg(op.node, 2, "dim1") % op.nd
    return op.same(b if op.o == a else a if op.o == b else op.o)


def _permute(op: _Op) -> Axes | None:
    dims = op.node.args[1] if isinstance(op.node.args[1], (list, tuple)) else op.node.args[1:]
    return op.same(dims[op.o] % op.nd)


def _expand(op: _Op) -> Axes | None:
    xt = fake(op.x)
    a = op.o - (op.nd - xt.dim())
    if a < 0 or (known_eq(xt.shape[a], 1) and not known_eq(op.length, 1)):
        return {**{n: None for n in op.ins if n is not op.x}, op.x: None}
    return op.same(a)


def _reshape(op: _Op) -> Axes | None:
    """A reshape that keeps the row axis whole, with the same number of elements before it."""
    name, xt = call_name(op.node), fake(op.x)
    if name == "squeeze" and len(op.node.args) < 2 and "dim" not in op.node.kwargs:
        return None  # squeezes whatever is 1, possibly the narrowed rows
    before = _prod(op.out.shape[:op.o])
    for a in range(xt.dim()):
        if known_eq(_prod(xt.shape[:a]), before) and known_eq(xt.shape[a], op.length):
            if name == "unflatten" and arg(op.node, 1, "dim") % xt.dim() == a:
                return None  # the rows themselves are unflattened
            return op.same(a)
    return None


def _getitem(op: _Op) -> Axes | None:
    """``x[idx]`` with basic indexing that leaves the input axis mapped to ``o`` whole."""
    xt = fake(op.x)
    idx = expand_index(op.node.args[1], xt.dim())
    if _runtime_bounds(idx) or not all(e is None or isinstance(e, (int, slice)) for e in idx):
        return None
    for e, dim, out in index_dims(idx):
        if out == op.o:
            full = isinstance(e, slice) and e.start in (None, 0) and e.stop is None and e.step in (None, 1)
            return op.same(dim) if full else None
    return None


UNARY = {"contiguous", "clone", "to", "float", "half", "bfloat16", "type_as", "type", "silu", "gelu",
         "relu", "tanh", "sigmoid", "neg", "exp", "rsqrt", "sqrt", "abs", "sin", "cos", "detach"}
ELEMENTWISE = {"add", "sub", "mul", "div", "where", "masked_fill", "maximum", "minimum", "pow", "__neg__"}

# the row-wise ops, one rule each (by normalised op name): adding an op is one entry
ROW_RULES: dict[str, Callable[[_Op], Axes | None]] = {
    **dict.fromkeys(UNARY, _unary), **dict.fromkeys(ELEMENTWISE, _elementwise),
    "softmax": _softmax, "log_softmax": _softmax, "dropout": _dropout, "linear": _linear, "matmul": _matmul,
    "layer_norm": _norm, "rms_norm": _norm, **dict.fromkeys(("mean", "sum", "amax", "amin"), _reduction),
    "transpose": _transpose, "permute": _permute, "expand": _expand,
    # "view" is normalised to "reshape"
    **dict.fromkeys(("reshape", "flatten", "unflatten", "unsqueeze", "squeeze"), _reshape),
    "getitem": _getitem, "stack": _stack, "cat": _cat,
}


SPLITS = {"split": 2, "split_with_sizes": 2, "chunk": 2, "unbind": 1}  # the position of their dim argument


def _split_dim(node: fx.Node) -> int | None:
    name = call_name(node)
    if name not in SPLITS or not isinstance(fake(node.args[0]), torch.Tensor):
        return None
    d = arg(node, SPLITS[name], "dim", 0)
    return d % fake(node.args[0]).dim() if isinstance(d, int) else None


def _split_axes(node: fx.Node, a: int) -> dict | None:
    """A split into pieces along another axis: for tuple-valued nodes, ``a`` is an axis of the input."""
    d = _split_dim(node)
    if d is None or a == d or not 0 <= a < fake(node.args[0]).dim():
        return None
    return {node.args[0]: a}


def expand_index(index: Any, ndim: int) -> list:
    """The index of ``x[index]`` with ``...`` expanded and full slices appended: one entry per dim of ``x``
    (ints, slices, tensor nodes — one dim each, 1-D indices only), plus its ``None``s."""
    idx = list(index) if isinstance(index, tuple) else [index]
    used = sum(1 for e in idx if e is not None and e is not Ellipsis)
    pos = next((i for i, e in enumerate(idx) if e is Ellipsis), None)
    if pos is not None:
        idx[pos:pos + 1] = [slice(None)] * (ndim - used)
    return idx + [slice(None)] * (ndim - sum(1 for e in idx if e is not None))


def index_dims(idx: list):
    """For each entry of an expanded index: (entry, the input dim it indexes — None for a ``None`` entry —,
    the output dim it leaves — None for an int). Output dims are only tracked up to the first tensor entry
    (advanced indexing may move the dims after it): None from there on."""
    dim, out = 0, 0
    for e in idx:
        if isinstance(e, fx.Node):
            out = None
        if e is None:
            yield e, None, out
        elif isinstance(e, slice):
            yield e, dim, out
            dim += 1
        else:
            yield e, dim, None
            dim += 1
            continue
        out = None if out is None else out + 1


def _runtime_bounds(idx: list) -> bool:
    return any(isinstance(e, slice) and any(isinstance(v, fx.Node) for v in (e.start, e.stop, e.step)) for e in idx)


def forward(node: fx.Node, src: fx.Node, axis: int) -> tuple[int, dict] | None:
    """The output axis of ``node`` whose rows are ``src``'s rows along ``axis`` and its ``input_axes``, if
    ``node`` is row-wise in them."""
    out = fake(node)
    if not isinstance(out, torch.Tensor):
        return None
    for o in range(out.dim()):
        m = input_axes(node, o)
        if m is not None and m.get(src) == axis:
            return o, m
    return None


def forward_axis(node: fx.Node, src: fx.Node, axis: int) -> int | None:
    found = forward(node, src, axis)
    return None if found is None else found[0]


# ---------------------------------------------------------------------------------------------
# rebuilding an op on a range of rows


def _rebuild(node: fx.Node, new: dict[fx.Node, fx.Node], o: int, length: int) -> fx.Node:
    """``node`` computed on the narrowed inputs ``new`` (old input -> narrowed node): rows along ``o`` only."""
    graph = node.graph
    args = fx.node.map_arg(node.args, lambda n: new.get(n, n))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: new.get(n, n))
    name = call_name(node)
    if name in ("reshape", "expand"):
        sizes = list(args[1] if isinstance(args[1], (list, tuple)) else args[1:])
        sizes[o] = length
        # x.view(...) is rebuilt as x.reshape(...): a narrowed input need not be viewable
        target = node.target if node.op == "call_function" else name
        return emit(graph, node.op, target, (args[0], tuple(sizes)), kwargs, like=node)
    return emit(graph, node.op, node.target, args, kwargs, like=node)


def _narrow(graph: fx.Graph, x: fx.Node, axis: int, lo: int, length: int, like: fx.Node) -> fx.Node:
    return emit(graph, "call_method", "narrow", (x, axis, lo, length), like=like)


def _safe_view(n: fx.Node, written: set[fx.Node]) -> bool:
    """A view in the region is rebuilt where it stood; if its memory is written in place before it is read,
    the rebuilt (possibly copied) value could differ: keep such views out."""
    if not aliases_input(n):
        return True
    root = alias_root(n)
    if root in written:
        return False
    return not (root.op in ("placeholder", "get_attr") and any(w.op in ("placeholder", "get_attr") for w in written))


def _uses(user: fx.Node, n: fx.Node) -> int:
    count = 0

    def visit(a):
        nonlocal count
        if a is n:
            count += 1
        return a

    fx.node.map_arg((user.args, user.kwargs), visit)
    return count


def narrowed(target: fx.Node, consumer: fx.Node, axis: int, lo: int, length: int) -> tuple[fx.Node, list[tuple]]:
    """A node equal to ``target.narrow(axis, lo, length)`` for ``consumer``'s one use of ``target``, computed
    by narrowing what only that use reads. Returns it and the ops now computed on fewer rows, as
    (old node, its narrowed replacement) pairs."""
    graph = target.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    written = written_roots(graph)
    demand: dict[fx.Node, int | None] = {target: axis}
    inside: dict[fx.Node, int] = {target: 1}  # uses of a node by the region (or by the consumer's one use)
    region: dict[fx.Node, dict] = {}  # member -> its input_axes
    heap = [(-order[target], target)]
    seen = set()
    while heap:
        _, n = heapq.heappop(heap)
        if n in seen:
            continue
        seen.add(n)
        a = demand.get(n)
        total = sum(_uses(u, n) for u in n.users)
        if a is None or total != inside.get(n, 0) or not _safe_view(n, written):
            continue
        axes = input_axes(n, a)
        if axes is None:
            continue
        region[n] = axes
        for p, pa in axes.items():
            if pa is None:
                continue
            if p in demand and demand[p] != pa:
                demand[p] = None  # two different axes asked: it stays whole (narrowed per use)
            elif p not in demand:
                demand[p] = pa
            inside[p] = inside.get(p, 0) + _uses(n, p)
            heapq.heappush(heap, (-order[p], p))
    # a piece of a split whose other pieces are read elsewhere: the piece, not the tuple, is narrowed
    members = sorted((n for n in region if not (n.args and isinstance(n.args[0], fx.Node) and
                                                isinstance(fake(n.args[0]), (tuple, list)) and n.args[0] not in region)),
                     key=order.get)
    if target not in members:  # nothing only this use reads (or the target itself is such a piece): a view
        with graph.inserting_before(consumer):
            return _narrow(graph, target, axis, lo, length, consumer), []
    new: dict[fx.Node, fx.Node] = {}
    leaves: dict[tuple[fx.Node, int], fx.Node] = {}
    for n in members:
        sub = {}
        with graph.inserting_before(n):
            for p, pa in region[n].items():
                if p in new:
                    sub[p] = new[p]
                elif pa is not None:
                    if (p, pa) not in leaves:
                        leaves[(p, pa)] = _narrow(graph, p, pa, lo, length, n)
                    sub[p] = leaves[(p, pa)]
            new[n] = _rebuild(n, sub, demand[n], length)
    return new[target], [(n, new[n]) for n in members]


# ---------------------------------------------------------------------------------------------
# sinking: users of a partly computed value computed on the same rows


class Part:
    """``new`` holds rows [lo, hi) of ``old``'s value along ``axis`` (``full`` rows in all)."""

    def __init__(self, new: fx.Node, axis: int, lo: int, hi: int, full: int):
        self.new, self.axis, self.lo, self.hi, self.full = new, axis, lo, hi, full


def _pad(graph: fx.Graph, p: Part, like: fx.Node) -> fx.Node:
    nd = fake(p.new).dim()
    pads: list[int] = []
    for d in range(nd - 1, p.axis - 1, -1):
        pads += [p.lo, p.full - p.hi] if d == p.axis else [0, 0]
    return emit(graph, "call_function", F.pad, (p.new, tuple(pads)), like=like)


def sink(old: fx.Node, part: Part) -> tuple[list[tuple], list[fx.Node]]:
    """Replace every use of ``old`` by ``part`` (its rows [lo, hi)), computing the row-wise users on those rows
    only, down to the selectors that read them. The caller guarantees no row outside [lo, hi) is ever read.
    Returns (the ops now computed on fewer rows as (old, new) pairs, the old nodes replaced)."""
    graph = old.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    parts: dict[fx.Node, Part] = {old: part}
    heap = [(order[u], u) for u in old.users]
    heapq.heapify(heap)
    done, narrowed_ops, replaced = set(), [], [old]
    while heap:
        _, u = heapq.heappop(heap)
        if u in done:
            continue
        done.add(u)
        ins = [p for p in u.all_input_nodes if p in parts]
        with graph.inserting_before(u):
            result = _selector(u, ins, parts) or _row_wise(u, ins, parts, narrowed_ops)
            if result is None:  # cannot follow: give this user the full-size value back
                padded = {p: _pad(graph, parts[p], u) for p in ins}
                u.args = fx.node.map_arg(u.args, lambda n: padded.get(n, n))
                u.kwargs = fx.node.map_arg(u.kwargs, lambda n: padded.get(n, n))
                continue
        if isinstance(result, Part):
            parts[u] = result
            narrowed_ops.append((u, result.new))
            for w in u.users:
                heapq.heappush(heap, (order[w], w))
        else:
            u.replace_all_uses_with(result)
        replaced.append(u)
    return narrowed_ops, replaced


def _row_wise(u: fx.Node, ins: list[fx.Node], parts: dict[fx.Node, Part], upstream: list) -> Part | None:
    first = parts[ins[0]]
    if any((parts[p].lo, parts[p].hi, parts[p].full) != (first.lo, first.hi, first.full) for p in ins):
        return None
    found = forward(u, ins[0], first.axis)
    if found is None:
        return None
    o, axes = found
    if any(axes.get(p) != parts[p].axis for p in ins):
        return None
    n = first.hi - first.lo
    sub = {}
    for p, pa in axes.items():
        if p in parts:
            sub[p] = parts[p].new
        elif pa is not None:  # another operand's rows: narrowed as far up as only this use reads it
            sub[p], pairs = narrowed(p, u, pa, first.lo, n)
            upstream.extend(pairs)
    return Part(_rebuild(u, sub, o, n), o, first.lo, first.hi, first.full)


def _selector(u: fx.Node, ins: list[fx.Node], parts: dict[fx.Node, Part]) -> fx.Node | Part | None:
    """``u`` reads rows of a part through a slice, an index, ``masked_select`` or ``index_select``."""
    if len(ins) != 1 or u.args[0] is not ins[0]:
        return None
    p = parts[ins[0]]
    src = fake(ins[0])
    name, graph = call_name(u), u.graph
    if name == "getitem":
        return _getitem(u, p, src)
    if name == "narrow" and arg(u, 1, "dim") % src.dim() == p.axis:
        start, n = arg(u, 2, "start"), arg(u, 3, "length")
        if not isinstance(start, int) or not isinstance(n, int):
            return None
        start = start + p.full if start < 0 else start
        return _sliced(u, p, start, start + n,
                       lambda a, b: _narrow(graph, p.new, p.axis, a, b - a, u))
    if name == "masked_select":
        mask = u.args[1]
        mt = fake(mask)
        a = p.axis - (src.dim() - mt.dim())
        if not isinstance(mask, fx.Node) or a < 0 or known_eq(mt.shape[a], 1) or not known_eq(mt.shape[a], p.full):
            return None
        return emit(graph, "call_method", "masked_select",
                    (p.new, _narrow(graph, mask, a, p.lo, p.hi - p.lo, u)), like=u)
    if name == "index_select" and arg(u, 1, "dim") % src.dim() == p.axis:
        index = arg(u, 2, "index")
        if p.lo:
            index = emit(graph, "call_function", torch.sub, (index, p.lo), like=u)
        return emit(graph, "call_function", torch.index_select, (p.new, p.axis, index), like=u)
    return None


def _sliced(u: fx.Node, p: Part, start: int, stop: int, build) -> fx.Node | Part | None:
    """Rows [start, stop) of the full value, taken from the part by ``build(a, b)`` (part coordinates)."""
    a, b = max(start, p.lo), min(stop, p.hi)
    if a >= b:
        return None
    new = build(a - p.lo, b - p.lo)
    if (a, b) == (start, stop):
        return new
    return Part(new, p.axis, a - start, b - start, stop - start)


def _getitem(u: fx.Node, p: Part, src: torch.Tensor) -> fx.Node | Part | None:
    idx = expand_index(u.args[1], src.dim())
    if _runtime_bounds(idx):
        return None
    tensors = [e for e in idx if isinstance(e, fx.Node)]
    for i, (e, dim, out_dim) in enumerate(index_dims(idx)):
        if dim != p.axis:
            if dim is not None and not isinstance(e, (int, slice)):
                return None  # advanced indexing before the rows
            continue
        if isinstance(e, int):
            r = e + p.full if e < 0 else e
            if not p.lo <= r < p.hi:
                return None
            idx[i] = r - p.lo
            return emit(u.graph, "call_function", u.target, (p.new, tuple(idx)), like=u)
        if isinstance(e, fx.Node) and tensors == [e] and (fake(e).dtype != torch.bool or fake(e).dim() == 1):
            # rows picked by a boolean or integer index
            n = p.hi - p.lo
            if fake(e).dtype == torch.bool:
                idx[i] = _narrow(u.graph, e, 0, p.lo, n, u)
            else:  # negative indices count from the full length
                idx[i] = emit(u.graph, "call_function", torch.sub,
                              (emit(u.graph, "call_function", torch.remainder, (e, p.full), like=u), p.lo), like=u)
            return emit(u.graph, "call_function", u.target, (p.new, tuple(idx)), like=u)
        if not isinstance(e, slice) or e.step not in (None, 1):
            return None
        start, stop, _ = e.indices(p.full)

        def build(a: int, b: int, i=i) -> fx.Node:
            idx[i] = slice(a, b)
            return emit(u.graph, "call_function", u.target, (p.new, tuple(idx)), like=u)

        result = _sliced(u, p, start, stop, build)
        if isinstance(result, Part):
            result.axis = out_dim
        return result
    return None
