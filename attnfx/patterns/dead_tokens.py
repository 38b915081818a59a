"""dead_tokens — query rows nobody reads and key columns nobody may attend are not computed.

What it matches
    * Dead query rows: an attention output whose rows reach the graph's outputs only through
      selectors that exclude some of them — ``x[:, a:b]`` slices, ``masked_select`` / ``index_select``
      with an index known at compile time — possibly after row-wise ops (transposes and reshapes that keep
      the row axis, linear layers, norms over other axes, activations, residual adds). The live rows are
      a contiguous range [a, b) (the hull of what is read).
    * Dead key columns: with a mask known at compile time, key positions at the edges of the key axis
      that no live row may attend (a column all False for every batch row, e.g. HunyuanImage3's stale
      ``<eoi>`` column, or keys only dead rows attended).

Why the rewrite is exact
    Attention computes each query row independently of the others, so computing only rows [a, b)
    (``q[..., a:b, :]`` with the mask's rows sliced alike) gives those rows bit for bit; the rows outside
    are filled with zeros and are, by the liveness analysis, never read. A key column that no computed
    row may attend has softmax weight exactly 0 in every row, so slicing it out of K, V and the mask
    changes nothing.

When it refuses
    Any use of the output the analysis cannot follow (a gather with a run-time index, a reduction over
    the rows, a reshape that merges the row axis) makes every row live: nothing is dropped, and the
    report says where liveness stopped. ``is_causal=True`` with dead leading rows (slicing would move the
    causal diagonal). Key columns are only dropped for masks known at compile time; a run-time mask's
    all-False columns are skipped by the structured kernels of ``mask_structure`` instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from attnfx.patterns._static import dependencies, evaluate
from attnfx.rewriter.graph import SDPA_ARGS, arg, call_name, emit, fake, hint, known_eq, op_name, sdpa_args
from attnfx.rewriter.site import Outcome, Site

NAME = "dead_tokens"

_SAME_ROWS = {"contiguous", "clone", "to", "float", "half", "bfloat16", "type_as", "type", "dropout",
              "silu", "gelu", "relu", "tanh", "sigmoid", "neg", "exp", "rsqrt", "sqrt", "pow", "abs", "linear",
              "softmax", "log_softmax"}
_NORMS = {"layer_norm", "rms_norm"}  # normalize over the last len(normalized_shape) dims
_BINARY = {"add", "sub", "mul", "div", "where", "masked_fill", "maximum", "minimum"}


class Live:
    """The rows of the attention output that are read: [lo, hi), or every row."""

    def __init__(self, lo: Any = None, hi: Any = None, why: str = ""):
        self.lo, self.hi, self.why = lo, hi, why

    @property
    def all(self) -> bool:
        return self.lo is None

    @staticmethod
    def every(why: str) -> "Live":
        return Live(None, None, why)


def _hull(a: Live | None, b: Live) -> Live:
    if a is None:
        return b
    if a.all or b.all:
        return a if a.all else b
    return Live(min(a.lo, b.lo), max(a.hi, b.hi))


def live_rows(node: fx.Node, axis: int, length: int, seen: dict | None = None) -> Live:
    """Which rows along ``axis`` (of size ``length``) of ``node``'s value are ever read."""
    seen = {} if seen is None else seen
    key = (node, axis)
    if key in seen:
        return seen[key]
    seen[key] = Live.every("cycle")  # DAG: never used, but safe
    result: Live | None = None
    for user in node.users:
        result = _hull(result, _use(user, node, axis, length, seen))
        if result.all:
            break
    seen[key] = result if result is not None else Live(0, 0)
    return seen[key]


def _static_value(n: Any, consumer: fx.Node):
    if not isinstance(n, fx.Node):
        return n
    tensors, ints, problem = dependencies(n, consumer)
    if tensors or ints or problem:
        return None
    return evaluate(n, consumer)


def _use(user: fx.Node, src: fx.Node, axis: int, length: int, seen: dict) -> Live:
    if user.op == "output":
        return Live.every("the output is returned whole")
    name = call_name(user)
    out = fake(user)
    src_t = fake(src)
    if not isinstance(src_t, torch.Tensor):
        return Live.every(f"read by {name}")
    nd = src_t.dim()
    if not isinstance(out, torch.Tensor):
        return Live.every(f"read by {name}")
    if name in _SAME_ROWS and user.args and user.args[0] is src and out.dim() == nd \
            and (name not in ("softmax", "log_softmax") or _dim_arg(user, nd) != axis):
        return live_rows(user, axis, length, seen)
    if name in _NORMS and user.args[0] is src:
        shape = arg(user, 1, "normalized_shape")
        if axis < nd - len(shape if isinstance(shape, (list, tuple)) else [shape]):
            return live_rows(user, axis, length, seen)
        return Live.every(f"{name} normalizes over the rows")
    if name in _BINARY or name in _SAME_ROWS:
        # broadcasting aligns dims from the right: row r of the result reads row r of this operand only
        new_axis = axis + out.dim() - nd
        if 0 <= new_axis < out.dim() and known_eq(out.shape[new_axis], length) and known_eq(src_t.shape[axis], length):
            return live_rows(user, new_axis, length, seen)
        return Live.every(f"{name} broadcasts the rows")
    if name in ("mean", "sum", "amax", "amin"):
        dims = arg(user, 1, "dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if dims and all((d % nd) != axis for d in dims):
            keep = arg(user, 2, "keepdim", False)
            new_axis = axis if keep else axis - sum(1 for d in dims if (d % nd) < axis)
            return live_rows(user, new_axis, length, seen)
        return Live.every(f"{name} reduces over the rows")
    if name == "transpose":
        a, b = arg(user, 1, "dim0") % nd, arg(user, 2, "dim1") % nd
        return live_rows(user, b if axis == a else a if axis == b else axis, length, seen)
    if name == "permute":
        dims = [d % nd for d in (user.args[1] if isinstance(user.args[1], (list, tuple)) else user.args[1:])]
        return live_rows(user, dims.index(axis), length, seen)
    if name in ("reshape", "flatten"):
        return _through_reshape(user, src_t, out, axis, length, seen)
    if name == "getitem":
        return _through_getitem(user, nd, axis, length, seen)
    if name == "masked_select":
        mask = _static_value(user.args[1], user)
        if mask is None:
            return Live.every("masked_select with a mask computed at run time")
        rows = torch.broadcast_to(mask, src_t.shape).movedim(axis, 0).reshape(length, -1).any(-1).nonzero()
        return Live(int(rows.min()), int(rows.max()) + 1) if rows.numel() else Live(0, 0)
    if name == "index_select" and arg(user, 1, "dim") % nd == axis:
        index = _static_value(arg(user, 2, "index"), user)
        if index is None:
            return Live.every("index_select with an index computed at run time")
        return Live(int(index.min()), int(index.max()) + 1) if index.numel() else Live(0, 0)
    return Live.every(f"read by {name}")


def _dim_arg(n: fx.Node, nd: int) -> int | None:
    d = arg(n, 1, "dim")
    return d % nd if isinstance(d, int) else None


def _through_reshape(user, src_t, out, axis, length, seen) -> Live:
    before = 1
    for s in src_t.shape[:axis]:
        before *= hint(s)
    acc = 1
    for i, s in enumerate(out.shape):
        if acc == before and known_eq(s, length):
            return live_rows(user, i, length, seen)
        acc *= hint(s)
    return Live.every("a reshape merges the row axis")


def _through_getitem(user, nd, axis, length, seen) -> Live:
    idx = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
    if any(e is Ellipsis for e in idx):
        pos = idx.index(Ellipsis)
        idx = idx[:pos] + (slice(None),) * (nd - (len(idx) - 1 - sum(e is None for e in idx))) + idx[pos + 1:]
    dim, new_axis = 0, 0
    for e in idx:
        if e is None:
            new_axis += 1
            continue
        if dim == axis:
            if isinstance(e, slice) and e.step in (None, 1) and not isinstance(e.start, fx.Node) \
                    and not isinstance(e.stop, fx.Node):
                start = 0 if e.start is None else (e.start + length if e.start < 0 else e.start)
                stop = length if e.stop is None else (e.stop + length if e.stop < 0 else min(e.stop, length))
                inner = live_rows(user, new_axis, stop - start, seen) if isinstance(stop - start, int) else Live.every("")
                if inner.all:
                    return Live(start, stop)
                return Live(start + inner.lo, start + inner.hi)
            if isinstance(e, int):
                i = e + length if e < 0 else e
                return Live(i, i + 1)
            return Live.every("rows indexed by a tensor")
        if isinstance(e, slice):
            new_axis += 1
        elif not isinstance(e, int):
            return Live.every("advanced indexing")
        dim += 1
    return live_rows(user, new_axis + (axis - dim), length, seen)


def rewrite(site: Site, ctx: Any) -> Outcome | None:
    node = site.node
    if op_name(node) != "sdpa":
        return None
    args = sdpa_args(node)
    q, k = fake(args["query"]), fake(args["key"])
    q_len, kv_len, row_axis = q.shape[-2], k.shape[-2], q.dim() - 2
    if not isinstance(q_len, int) or not isinstance(kv_len, int):
        return None  # symbolic lengths: the row range cannot be fixed at compile time
    live = live_rows(node, row_axis, q_len)
    lo, hi = (0, q_len) if live.all else (live.lo, live.hi)
    mask = args["attn_mask"]
    m = fake(mask) if isinstance(mask, fx.Node) else None
    static_mask = _static_value(mask, node) if m is not None else None
    c0, c1 = 0, kv_len
    if static_mask is not None and hi > lo:
        allowed = static_mask if static_mask.dtype == torch.bool else static_mask > float("-inf")
        allowed = torch.broadcast_to(allowed, (*allowed.shape[:-2], q_len, kv_len))[..., lo:hi, :]
        cols = allowed.reshape(-1, allowed.shape[-2], kv_len).any(0).any(0).nonzero()
        if cols.numel():
            c0, c1 = int(cols.min()), int(cols.max()) + 1
    if (lo, hi) == (0, q_len) and (c0, c1) == (0, kv_len):
        return None
    if lo == hi:
        return None  # nothing read at all: dead code elimination's business, not ours
    if args["is_causal"] and (lo > 0 or c0 > 0 or c1 < kv_len):
        return Outcome.refuse("is_causal with dead leading rows or keys: slicing would move the diagonal")
    if not (isinstance(args["dropout_p"], (int, float)) and args["dropout_p"] == 0):
        return Outcome.refuse(f"dropout_p={args['dropout_p']}")

    graph = node.graph
    with graph.inserting_before(node):
        if (lo, hi) != (0, q_len):
            args["query"] = emit(graph, "call_method", "narrow", (args["query"], -2, lo, hi - lo), like=node)
        if (c0, c1) != (0, kv_len):
            for name in ("key", "value"):
                args[name] = emit(graph, "call_method", "narrow", (args[name], -2, c0, c1 - c0), like=node)
        if m is not None:
            if (lo, hi) != (0, q_len) and m.dim() >= 2 and not known_eq(m.shape[-2], 1):
                mask = emit(graph, "call_method", "narrow", (mask, -2, lo, hi - lo), like=node)
            if (c0, c1) != (0, kv_len) and not known_eq(m.shape[-1], 1):
                mask = emit(graph, "call_method", "narrow", (mask, -1, c0, c1 - c0), like=node)
            args["attn_mask"] = mask
        kwargs = {k: args[k] for k in SDPA_ARGS[3:] if k in args}
        new = emit(graph, "call_function", node.target, (args["query"], args["key"], args["value"]), kwargs,
                   like=node)
        out = new
        if (lo, hi) != (0, q_len):
            out = emit(graph, "call_function", F.pad, (new, (0, 0, lo, q_len - hi)), like=node)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    heads, dim = q.shape[-3], q.shape[-1]
    batch = 1
    for s in q.shape[:-3]:
        batch *= hint(s)
    dead_pairs = q_len * kv_len - (hi - lo) * (c1 - c0)
    how = []
    if (lo, hi) != (0, q_len):
        how.append(f"only query rows [{lo}, {hi}) are read")
    if (c0, c1) != (0, kv_len):
        how.append(f"no read row may attend keys outside [{c0}, {c1})")
    return Outcome(
        rewritten=True, node=new, output=out if site.output is node else None,
        details={"dead_tokens": {"queries": q_len - (hi - lo), "keys": kv_len - (c1 - c0), "how": "; ".join(how)},
                 "live_rows": [lo, hi]},
        savings={"attention_flops": 4 * dim * heads * batch * dead_pairs},
    )
