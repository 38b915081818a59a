"""dead_tokens — query rows nobody reads and key columns nobody may attend are not computed.

What it matches
    * Dead query rows: an attention output whose rows reach the graph's outputs only through
      selectors that exclude some of them — ``x[:, a:b]`` / ``narrow`` / integer indices, ``masked_select``,
      ``index_select``, boolean or integer tensor indexing — possibly after row-wise ops (the table of
      ``_rows.input_axes``: transposes and reshapes that keep the row axis, linear layers, norms and
      reductions over other axes, activations, residual adds, RoPE). The live rows are a contiguous range
      [a, b) (the hull of what is read).
    * Dead key columns: with a mask known at compile time, key positions at the edges of the key axis
      that no live row may attend (a column all False for every batch row, e.g. HunyuanImage3's stale
      ``<eoi>`` column, or keys only dead rows attended).

What it rewrites
    The attention runs on query rows [a, b) and key columns [c, d) only; the narrowing is pushed upstream
    through the row-wise ops only the attention reads (``_rows.narrowed``: the query projection, RoPE and
    norms of dead rows, the K/V projections of dead keys are not computed) and downstream through the
    row-wise users of the output down to the selectors (``_rows.sink``: o_proj, residual adds, norms, MLP).

Why the rewrite is exact
    Attention computes each query row independently of the others, so computing only rows [a, b)
    (``q[..., a:b, :]`` with the mask's rows sliced alike) gives those rows bit for bit. A row-wise op's rows
    [a, b) are the op applied to its inputs' rows [a, b), so the narrowing moves through such ops without
    changing a value; where a user cannot follow, it gets the full size back with zero rows that, by the
    liveness analysis, are never read. A key column that no computed row may attend has softmax weight
    exactly 0 in every row, so removing it from K, V and the mask changes nothing.

Index sets passed in
    When rows are read through an index set computed from graph inputs alone by a few cheap ops
    (``masked_select(image_mask)`` with ``image_mask`` an input), the rows the example call's index set reads are taken, and the graph is
    guarded (``attnfx.runtime.guards``): each call checks — once per distinct index tensor, cached — that
    its index set reads within those rows, and otherwise runs the graph compiled without this
    specialization. (``masked_select`` and boolean indexing are in the graph because attnfx's backend turns on
    ``torch._dynamo.config.capture_dynamic_output_shape_ops`` for the frames it compiles.)

When it refuses
    Any use of the output the analysis cannot follow (a reduction over the rows, a reshape that merges the
    row axis, a gather whose index takes heavy compute or random ops) makes every row live: nothing is
    dropped; where a selector was met but could not be followed, the report says why. ``is_causal=True`` with dead leading rows or keys (slicing would move the causal diagonal).
    Key columns are only dropped for masks known at compile time; a run-time mask's all-False columns are
    skipped by the structured kernels of ``mask_structure`` instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from attnfx.fx.graph import SDPA_ARGS, arg, call_name, emit, fake, hint, known_eq, numel_hint
from attnfx.fx.static import cheap, constant_value, input_names, runtime_value
from attnfx.patterns._rows import Part, expand_index, forward_axis, index_dims, narrowed, sink
from attnfx.patterns.base import Outcome, PassContext, Pattern, Refused, Site
from attnfx.runtime.guards import Guard
from attnfx.runtime.guards import add as add_guard

class Live:
    """The rows of the attention output that are read: [lo, hi), or every row; and the run-time index sets
    that range was read off (each must be checked again at run time: ``attnfx.runtime.guards``)."""

    def __init__(self, lo: Any = None, hi: Any = None, why: str = "", guards: tuple = (), selector: bool = False):
        self.lo, self.hi, self.why, self.guards = lo, hi, why, guards
        self.selector = selector  # every row counts as read because a selector could not be followed

    @property
    def all(self) -> bool:
        return self.lo is None

    @staticmethod
    def every(why: str, selector: bool = False) -> "Live":
        return Live(None, None, why, selector=selector)


def _hull(a: Live | None, b: Live) -> Live:
    if a is None:
        return b
    if a.all or b.all:
        return a if a.all else b
    return Live(min(a.lo, b.lo), max(a.hi, b.hi), guards=a.guards + b.guards)


def rows_read(kind: str, index: torch.Tensor, shape: Sequence[int], axis: int) -> tuple[int, int]:
    """The hull [lo, hi) of the rows along ``axis`` of a tensor of ``shape`` that an index set reads:
    ``masked_select``'s mask (broadcast to the shape), a boolean index starting at ``axis``, integer indices
    into ``axis``. (0, 0) when it reads none."""
    length = shape[axis]
    if kind == "mask":
        try:
            if torch.broadcast_shapes(index.shape, tuple(shape)) != tuple(shape):
                return 0, length  # the mask broadcasts the tensor: not a selection of its rows
        except RuntimeError:
            return 0, length  # shapes that do not broadcast: the original raises; so must the graph that runs
        rows = torch.broadcast_to(index, tuple(shape)).movedim(axis, 0).reshape(length, -1).any(-1).nonzero()
    elif kind == "bool":
        if index.dim() != 1 or index.shape[0] != length:
            return 0, length  # the original raises; so must the graph that runs
        rows = index.nonzero()
    else:
        index = index.reshape(-1)
        if index.numel() and (int(index.max()) >= length or int(index.min()) < -length):
            return 0, length  # out of range: the original raises; so must the graph that runs
        rows = index % length
    return (int(rows.min()), int(rows.max()) + 1) if rows.numel() else (0, 0)


class Liveness:
    """Which rows of a value are ever read, following its users (``ctx`` lends the example inputs that
    run-time index sets are read from; without it such index sets make every row live)."""

    def __init__(self, ctx: PassContext | None = None):
        self.example_inputs = ctx.example_inputs if ctx is not None and ctx.specialize else None
        self.seen: dict = {}

    def rows(self, node: fx.Node, axis: int, length: int) -> Live:
        """Which rows along ``axis`` (of size ``length``) of ``node``'s value are ever read."""
        key = (node, axis)
        if key in self.seen:
            return self.seen[key]
        self.seen[key] = Live.every("cycle")  # DAG: never used, but safe
        result: Live | None = None
        for user in node.users:
            result = _hull(result, self._use(user, node, axis, length))
            if result.all:
                break
        self.seen[key] = result if result is not None else Live(0, 0)
        return self.seen[key]

    def _use(self, user: fx.Node, src: fx.Node, axis: int, length: int) -> Live:
        if user.op == "output":
            return Live.every("the output is returned whole")
        name = call_name(user)
        src_t = fake(src)
        if not isinstance(src_t, torch.Tensor) or not isinstance(fake(user), torch.Tensor):
            return Live.every(f"read by {name}")
        nd = src_t.dim()
        if name == "getitem":
            return self._getitem(user, nd, axis, length)
        if name == "narrow" and user.args[0] is src and arg(user, 1, "dim") % nd == axis:
            start, n = arg(user, 2, "start"), arg(user, 3, "length")
            if isinstance(start, int) and isinstance(n, int):
                start = start + length if start < 0 else start
                return self._slice(user, axis, length, slice(start, start + n))
        if name == "masked_select" and user.args[0] is src:
            return self._indexed(user, user.args[1], "mask", src_t.shape, axis, "masked_select")
        if name == "index_select" and user.args[0] is src and arg(user, 1, "dim") % nd == axis:
            return self._indexed(user, arg(user, 2, "index"), "index", src_t.shape, axis, "index_select")
        out_axis = forward_axis(user, src, axis)
        if out_axis is not None:
            return self.rows(user, out_axis, length)
        return Live.every(f"read by {name}")

    def _slice(self, user: fx.Node, new_axis: int, length: int, e: slice) -> Live:
        start, stop, _ = e.indices(length)
        stop = max(start, stop)
        inner = self.rows(user, new_axis, stop - start)
        if inner.all:
            return Live(start, stop)
        return Live(start + inner.lo, start + inner.hi, guards=inner.guards)

    def _indexed(self, user: fx.Node, index: Any, kind: str, shape, axis: int, what: str) -> Live:
        shape = tuple(hint(d) for d in shape)
        value, found = constant_value(index, user), None
        if value is None:
            found = runtime_value(index, user, self.example_inputs) if isinstance(index, fx.Node) else None
            if found is None:
                return Live.every(f"{what} with an index set not computed from graph inputs alone", selector=True)
            if not cheap(found[1]):
                return Live.every(f"{what} with an index set that takes heavy compute (checking it on every new "
                                  "input would cost more than it saves)", selector=True)
            value = found[0]
        lo, hi = rows_read(kind, value, shape, axis)
        if found is None:
            return Live(lo, hi)

        def holds(v: torch.Tensor, kind=kind, shape=shape, axis=axis, lo=lo, hi=hi) -> bool:
            a, b = rows_read(kind, v, shape, axis)
            return a >= b or (lo <= a and b <= hi)

        return Live(lo, hi, guards=(Guard(f"{what} with an index set from {input_names(found[1])}", found[1],
                                          found[2], holds, {"rows": [lo, hi]}),))

    def _getitem(self, user: fx.Node, nd: int, axis: int, length: int) -> Live:
        idx = expand_index(user.args[1], nd)
        tensors = [e for e in idx if isinstance(e, fx.Node)]
        for e, dim, out in index_dims(idx):
            if dim != axis:
                if dim is not None and not isinstance(e, (int, slice)):
                    return Live.every("advanced indexing", selector=True)
                continue
            if isinstance(e, slice) and e.step in (None, 1) and not isinstance(e.start, fx.Node) \
                    and not isinstance(e.stop, fx.Node):
                return self._slice(user, out, length, e)
            if isinstance(e, int):
                i = e + length if e < 0 else e
                return Live(i, i + 1)
            if isinstance(e, fx.Node) and tensors == [e] and isinstance(fake(e), torch.Tensor) \
                    and (fake(e).dtype != torch.bool or fake(e).dim() == 1):
                shape = fake(user.args[0]).shape
                return self._indexed(user, e, "bool" if fake(e).dtype == torch.bool else "index", shape, axis,
                                     "indexing")
            return Live.every("rows indexed by a tensor along with other tensors", selector=True)
        return Live.every("an index that does not reach the rows")


def rewrite(site: Site, ctx: PassContext) -> Outcome | None:
    node = site.node
    args = site.args()
    q, k = fake(args["query"]), fake(args["key"])
    q_len, kv_len, row_axis = q.shape[-2], k.shape[-2], q.dim() - 2
    if not isinstance(q_len, int) or not isinstance(kv_len, int):
        return None  # symbolic lengths: the row range cannot be fixed at compile time
    live = Liveness(ctx).rows(node, row_axis, q_len)
    lo, hi = (0, q_len) if live.all else (live.lo, live.hi)
    mask = args["attn_mask"]
    m = fake(mask) if isinstance(mask, fx.Node) else None
    static_mask = constant_value(mask, node) if m is not None else None
    c0, c1 = 0, kv_len
    if static_mask is not None and hi > lo:
        allowed = static_mask if static_mask.dtype == torch.bool else static_mask > float("-inf")
        allowed = torch.broadcast_to(allowed, (*allowed.shape[:-2], q_len, kv_len))[..., lo:hi, :]
        cols = allowed.reshape(-1, allowed.shape[-2], kv_len).any(0).any(0).nonzero()
        if cols.numel():
            c0, c1 = int(cols.min()), int(cols.max()) + 1
    rows_dead, keys_dead = (lo, hi) != (0, q_len), (c0, c1) != (0, kv_len)
    if not rows_dead and not keys_dead:
        if live.selector:  # the output is selected from, but which rows could not be proven
            raise Refused(f"every query row counts as read: {live.why}")
        return None
    if lo == hi:
        return None  # nothing read at all: dead code elimination's business, not ours
    if args["is_causal"] and (lo > 0 or c0 > 0 or c1 < kv_len):
        raise Refused("is_causal with dead leading rows or keys: slicing would move the diagonal")
    if not (isinstance(args["dropout_p"], (int, float)) and args["dropout_p"] == 0):
        raise Refused(f"dropout_p={args['dropout_p']}")

    guards = live.guards if rows_dead else ()
    for g in guards:
        add_guard(ctx.guards, g, site.record)

    graph = node.graph
    upstream: list[fx.Node] = []
    if rows_dead:
        args["query"], pairs = narrowed(args["query"], node, row_axis, lo, hi - lo)
        upstream += pairs
    if keys_dead:
        for name in ("key", "value"):
            args[name], pairs = narrowed(args[name], node, fake(args[name]).dim() - 2, c0, c1 - c0)
            upstream += pairs
    with graph.inserting_before(node):
        if m is not None:
            if rows_dead and m.dim() >= 2 and not known_eq(m.shape[-2], 1):
                mask = emit(graph, "call_method", "narrow", (mask, -2, lo, hi - lo), like=node)
            if keys_dead and not known_eq(m.shape[-1], 1):
                mask = emit(graph, "call_method", "narrow", (mask, -1, c0, c1 - c0), like=node)
            args["attn_mask"] = mask
        kwargs = {k: args[k] for k in SDPA_ARGS[3:] if k in args}
        new = emit(graph, "call_function", node.target, (args["query"], args["key"], args["value"]), kwargs,
                   like=node)
    downstream, replaced = [], [node]
    if rows_dead:
        downstream, replaced = sink(node, Part(new, row_axis, lo, hi, q_len))
    else:
        node.replace_all_uses_with(new)
    heads, dim = q.shape[-3], q.shape[-1]
    batch = 1
    for s in q.shape[:-3]:
        batch *= hint(s)
    dead_pairs = q_len * kv_len - (hi - lo) * (c1 - c0)
    how = []
    if rows_dead:
        how.append(f"only query rows [{lo}, {hi}) are read")
    if guards:
        how.append("the rows an index set passed in reads are checked per distinct index tensor")
    if keys_dead:
        how.append(f"no read row may attend keys outside [{c0}, {c1})")
    return Outcome(
        node=new, output=new if site.output is node else dict(downstream).get(site.output),
        replaced=replaced + [old for old, _ in upstream],
        details={"dead_tokens": {"queries": q_len - (hi - lo), "keys": kv_len - (c1 - c0), "how": "; ".join(how)},
                 "ops_on_fewer_rows": {"before": len(upstream), "after": len(downstream)},
                 "live_rows": [lo, hi]},
        savings={"attention_flops": 4 * dim * heads * batch * dead_pairs,
                 "projection_flops": sum(_matmul_flops_saved(*pair) for pair in upstream + downstream)},
    )


def _matmul_flops_saved(old: fx.Node, new: fx.Node) -> int:
    """FLOPs a linear/matmul no longer spends on dead rows: 2 · (output elements dropped) · inner size."""
    if call_name(old) not in ("linear", "matmul"):
        return 0
    inner = hint(fake(old.args[0]).shape[-1])
    return 2 * inner * (numel_hint(fake(old)) - numel_hint(fake(new)))


PATTERN = Pattern("dead_tokens", rewrite, applies_to="sdpa", after=("gqa",))
