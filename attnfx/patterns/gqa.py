"""gqa — K/V head expansion feeding SDPA becomes SDPA reading the un-expanded K/V (``enable_gqa=True``).

What it matches
    An SDPA call whose ``key`` and ``value`` are index-movement chains (see ``_layout.py``) that copy
    a source tensor along the head axis: every spelling real code uses reduces to a layout whose head
    dim is ``[src h, rep n]``:
      * HF ``repeat_kv``: ``x[:, :, None].expand(b, hkv, n, s, d).reshape(b, hkv*n, s, d)``;
      * BSHD: ``x[:, :, :, None].expand(b, s, hkv, n, d).reshape(b, s, h, d).permute(0, 2, 1, 3)``;
      * ``x.repeat_interleave(n, dim=1)``;
      * grouped repeat: ``x[:, :, None].repeat(1, 1, n, 1, 1).reshape(...)``;
    with or without ``.contiguous()`` / ``.clone()`` / transposes in between.

Why the rewrite is exact
    A head dim ``[src h, rep n]`` means query head ``i`` reads source head ``i // n`` — precisely
    SDPA's ``enable_gqa`` rule (``key.repeat_interleave(Hq // Hkv, dim=-3)``). Every other dim of the
    layout is a plain source dim, so ``source.permute(...)`` (and a view-``reshape`` that only drops
    or adds size-1 dims) is the un-expanded K/V in SDPA's ``(..., Hkv, S, D)`` order. Movement ops
    never change values, so SDPA receives the same numbers per (query head, key) pair. All size
    facts are proven for every value of the shape symbols, so one dynamic graph stays correct.

When it refuses (and the expansion stays)
    * tiled head order (``k.repeat(1, n, 1, 1)``: head ``i`` reads ``i % Hkv``), or any other
      head layout that is not grouped;
    * only one of K and V expanded, or K and V expanded by different factors;
    * dropout_p > 0 (random: the result cannot be checked equal);
    * the capability table says the kernel SDPA would then pick does not take GQA natively while
      the original's kernel was better (e.g. a fall back to the math kernel), or the two kernels
      disagree on rows with no allowed key.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from attnfx.backends import capabilities
from attnfx.backends import sdpa as sdpa_backend
from attnfx.fx.graph import emit, fake, known_eq, numel_hint, op_name, set_sdpa_args
from attnfx.patterns._layout import trace
from attnfx.patterns.base import Outcome, PassContext, Pattern, Refused, Site


@dataclass
class Expansion:
    source: fx.Node
    layout: tuple
    n_rep: Any
    kv_heads: Any
    chain: list


def find_expansion(node: fx.Node) -> Expansion | str | None:
    """How ``node`` (an SDPA key/value) expands a source along its head axis.

    Returns an Expansion, a reason string when it is an expansion we must not rewrite, or None when
    ``node`` is not a head expansion at all. Of all readings, the one cheapest to undo wins.
    """
    best, refusal = None, None
    for source, layout, chain in trace(node):
        if not any(a.kind == "rep" for dim in layout for a in dim):
            continue
        heads = layout[-3]
        if any(a.kind == "rep" for dim in layout[:-3] + layout[-2:] for a in dim):
            refusal = refusal or "K/V are broadcast along a non-head axis"
            continue
        reps = [a for a in heads if a.kind == "rep"]
        srcs = [a for a in heads if a.kind == "src"]
        if len(reps) != 1 or len(srcs) > 1:
            refusal = refusal or f"head axis layout {list(heads)} is not a single grouped expansion"
            continue
        if srcs and heads.index(reps[0]) < heads.index(srcs[0]):
            refusal = refusal or (
                "tiled head order (query head i reads K/V head i % Hkv, as from .repeat(1, n, 1, 1)); "
                "SDPA's enable_gqa needs grouped order (i // n_rep)"
            )
            continue
        exp = Expansion(source, layout, reps[0].size, srcs[0].size if srcs else 1, chain)
        if best is None or _undo_cost(exp) < _undo_cost(best):
            best = exp
    return best if best is not None else refusal


def _src_order(exp: Expansion) -> list[int]:
    """Source dims in the order SDPA needs them; unlisted (size-1) dims go right after their predecessor."""
    order = [a.dim for dim in exp.layout for a in dim if a.kind == "src"]
    ndim = fake(exp.source).dim()
    for d in range(ndim):
        if d not in order:
            order.insert(order.index(d - 1) + 1 if d > 0 else 0, d)
    return order


def _undo_cost(exp: Expansion) -> tuple[int, int]:
    order = _src_order(exp)
    permute = int(order != sorted(order))
    reshape = int(fake(exp.source).dim() != len(exp.layout))
    return (permute + reshape, -len(exp.chain))


def _size_node(graph: fx.Graph, source: fx.Node, atoms: tuple, like: fx.Node) -> Any:
    size: Any = 1
    for a in atoms:
        if a.kind != "src":
            continue
        if isinstance(a.size, int) and isinstance(size, int):
            size *= a.size
            continue
        dim = a.size if isinstance(a.size, int) else emit(graph, "call_function", torch.ops.aten.sym_size.int,
                                                           (source, a.dim), like=like)
        size = dim if (isinstance(size, int) and size == 1) else emit(
            graph, "call_function", operator.mul, (size, dim), like=like)
    return size


def undo(graph: fx.Graph, exp: Expansion, like: fx.Node) -> fx.Node:
    """Build the un-expanded tensor in SDPA's (..., Hkv, S, D) order from the expansion's source."""
    node = exp.source
    order = _src_order(exp)
    if order != list(range(len(order))):
        node = emit(graph, "call_method", "permute", (node, *order), like=like)
    target = [tuple(a for a in dim if a.kind == "src") for dim in exp.layout]
    shape = fake(node).shape
    if len(shape) != len(target) or not all(
        known_eq(s, _prod(atoms)) for s, atoms in zip(shape, target)
    ):
        sizes = [_size_node(graph, exp.source, atoms, like) for atoms in target]
        node = emit(graph, "call_method", "reshape", (node, *sizes), like=like)
    return node


def _prod(atoms: tuple) -> Any:
    p: Any = 1
    for a in atoms:
        p = p * a.size
    return p


def _materialized_bytes(t: torch.Tensor) -> int:
    """Bytes of an expanded K/V, if it was really copied (no stride-0 dims), else 0."""
    if any(st == 0 for st, sz in zip(t.stride(), t.shape) if not known_eq(sz, 1)):
        return 0
    return numel_hint(t) * t.element_size()


def rewrite(site: Site, ctx: PassContext) -> Outcome | None:
    node = site.node
    args = site.args()
    k_exp, v_exp = find_expansion(args["key"]), find_expansion(args["value"])
    if k_exp is None and v_exp is None:
        return None
    for name, exp in (("key", k_exp), ("value", v_exp)):
        if isinstance(exp, str):
            raise Refused(f"{name}: {exp}")
    if k_exp is None or v_exp is None:
        raise Refused("only one of K and V is expanded; SDPA's enable_gqa needs both with the same heads")
    if not (known_eq(k_exp.n_rep, v_exp.n_rep) and known_eq(k_exp.kv_heads, v_exp.kv_heads)):
        raise Refused(f"K and V are expanded differently (n_rep {k_exp.n_rep} vs {v_exp.n_rep})")
    dropout = args["dropout_p"]
    if not (isinstance(dropout, (int, float)) and dropout == 0):
        raise Refused(f"dropout_p={dropout}: random, so the rewrite could not be checked equal")

    q, k, v = fake(args["query"]), fake(args["key"]), fake(args["value"])
    mask = fake(args["attn_mask"]) if args["attn_mask"] is not None else None
    inputs = sdpa_backend.SdpaInputs.from_fakes(q, k, v, mask, dropout, args["is_causal"], args["scale"])
    before = sdpa_backend.predict_kernel(inputs, enable_gqa=False)
    after = sdpa_backend.predict_kernel(inputs.with_kv_heads(k_exp.kv_heads), enable_gqa=True)
    verdict = _kernel_verdict(before, after, has_mask=mask is not None)
    if verdict is not None:
        raise Refused(verdict, kernel=before)

    graph = node.graph
    old_k, old_v = args["key"], args["value"]
    with graph.inserting_before(node):
        args["key"] = undo(graph, k_exp, like=node)
        args["value"] = undo(graph, v_exp, like=node)
    args["enable_gqa"] = True
    set_sdpa_args(node, args)

    for old, new in ((old_k, args["key"]), (old_v, args["value"])):
        for user in list(old.users):
            _commute_key_mean(user, new, k_exp.n_rep, after=node)

    saved = 0
    notes = []
    for old in (old_k, old_v):
        if len(old.users) == 0:
            saved += _materialized_bytes(fake(old))
        else:
            notes.append(f"{old.name} is also used elsewhere, so its expansion is still computed")
    if after is not None and capabilities.kernel(after).gqa != "native":
        notes.append(f"kernel {after} expands K/V internally")
    return Outcome(
        reason="; ".join(notes) or None,
        savings={"kv_expansion_bytes": saved},
        details={"n_rep": _int(k_exp.n_rep), "kv_heads": _int(k_exp.kv_heads), "sdpa_kernel": after or "unknown"},
        replaced=[old_k, old_v],
    )


def _commute_key_mean(user: fx.Node, new: fx.Node, n_rep: Any, after: fx.Node) -> None:
    """``expanded.mean(-2, keepdim=True)`` (manual_attention's guard for rows with no allowed key) is
    the expansion of ``source.mean(-2, keepdim=True)``: compute it on the source, expand the small result."""
    if not (op_name(user) == "mean" and user.args[1:] == (-2,) and user.kwargs == {"keepdim": True}
            and isinstance(n_rep, int) and _comes_after(user, after)):
        return
    graph = user.graph
    with graph.inserting_before(user):
        mean = emit(graph, "call_method", "mean", (new, -2), {"keepdim": True}, like=user)
        expanded = emit(graph, "call_method", "repeat_interleave", (mean, n_rep), {"dim": -3}, like=user)
    user.replace_all_uses_with(expanded)
    graph.erase_node(user)


def _comes_after(node: fx.Node, anchor: fx.Node) -> bool:
    cur = anchor.next
    while cur.op != "root":
        if cur is node:
            return True
        cur = cur.next
    return False


def _int(x: Any) -> Any:
    return x if isinstance(x, int) else str(x)


def _kernel_verdict(before: str | None, after: str | None, has_mask: bool) -> str | None:
    """None when SDPA with enable_gqa runs a kernel at least as good as the original's, else why not."""
    if after is None or before is None:
        return None  # selector unavailable (old torch / no device at compile time): exact anyway
    if capabilities.kernel(after).gqa != "native" and after != before:
        return (f"with enable_gqa SDPA would run {after} (which {capabilities.kernel(after).note or 'expands K/V'}) "
                f"instead of {before}; expansion kept")
    if has_mask and after != before:
        a, b = capabilities.kernel(after).no_key_rows, capabilities.kernel(before).no_key_rows
        if a != b or {"unknown", "other"} & set(a.values()):
            return (f"with enable_gqa SDPA would switch from {before} to {after}, which may differ on query rows "
                    f"with no allowed key; expansion kept")
    return None


PATTERN = Pattern("gqa", rewrite, applies_to="sdpa", after=("manual_attention",))
