"""manual_attention — ``softmax(q @ kᵀ · scale + mask) @ v`` written by hand becomes one SDPA call.

What it matches
    A softmax over the last dim whose probabilities (through dtype casts, an inactive dropout and a view
    merging batch×heads) are the left operand of ``matmul(P, v)``, and whose scores are ``matmul(q, kᵀ)``
    followed by any of: multiplication/division by a constant (scale), ``+ tensor`` / ``- tensor``
    (additive mask or bias, e.g. HF eager's ``where(bool, 0, finfo.min)``, ALiBi), ``± number``,
    ``masked_fill(cond, fill)`` / ``where(cond, scores, fill)`` with fill -inf or ``finfo(dtype).min``, dtype
    casts, and a view splitting batch×heads — the way eager code writes it (HF ``eager_attention_forward``:
    float32 softmax then ``.to(q.dtype)``; diffusers' ``baddbmm(mask, q, kᵀ, beta, alpha)`` then ``bmm``;
    Bloom's ``alibi.baddbmm(q, kᵀ)`` on (batch·heads, Q, K), viewed as (batch, heads, Q, K) for the mask and
    the softmax and back for ``bmm``). Each op may be written in place (``scores /= c``, ``scores.mul_(c)``,
    ``scores.masked_fill_(cond, fill)`` whose result is dropped, as Falcon and XLM write them). The scale may
    be symbolic when it is exactly 1/√head_dim (``/ q.size(-1) ** 0.5`` under dynamic shapes).

Why the rewrite is exact
    SDPA computes ``softmax(q @ kᵀ · scale + attn_mask) @ v`` with the softmax in float32:
      * the scale is the product of the constant factors, passed explicitly (SDPA's default would
        be 1/√d), or SDPA's default when the factor is provably 1/√head_dim; an additive term met
        before a later factor is multiplied by that factor; baddbmm's beta scales its mask;
      * additive tensors become a float ``attn_mask`` (their sum, in the order they were added; a subtracted
        one with factor -1);
      * a replacement by -inf excludes the key: a bool mask, True = attend;
      * a replacement by ``finfo.min`` equals adding ``finfo.min`` (|score| ≪ 10³⁰ is absorbed by
        rounding);
      * a ``± number`` shifts a whole row: softmax ignores it;
      * dropout with p = 0 or ``training=False`` is the identity.
    Batch×heads views. ``view``/``reshape``/``flatten``/``unflatten`` follow the row-major order of the
    elements whatever the strides, so a view taking scores S₃ of shape (N, Q, K), N = B·H, to S₄ of shape
    (B, H, Q, K) is S₄[b, h] = S₃[b·H + h]; and a view taking the probabilities P₄ (B, H, Q, K) back to
    P₃ (N, Q, K) is P₃[b·H + h] = P₄[b, h] (checked on the shapes: only the leading dim is split or merged,
    Q and K unchanged, and the split and the merge agree on B and H). With q₄[b, h] = q₃[b·H + h] — the
    same row-major ``unflatten(0, (B, H))`` applied to q, k, v and to every (N, ·, ·) term added before the
    view, while terms with a leading dim of 1 broadcast over both —
    S₄[b, h] = scale · q₄[b, h] @ k₄[b, h]ᵀ + terms₄[b, h], so SDPA on q₄, k₄, v₄ with the terms as its
    mask computes P₄[b, h] @ v₄[b, h] = P₃[n] @ v₃[n] = out₃[n] for n = b·H + h: its output flattened over
    (B, H) is the original's. Any other view (one touching Q or K, a split that q/k/v cannot follow) is
    refused.
    In-place ops. An op writing into a tensor nothing else reads computes what its out-of-place form
    computes, and the value read after it is its result. So the scores are read as the last in-place write
    before each read (XLM: ``scores.masked_fill_(...)`` then ``softmax(scores.float())``), and an in-place
    op is parsed as its out-of-place form, provided the memory it writes belongs to the score computation
    alone: everything that may share that memory (its views, casts that may return their input, in-place
    results) is read and written only by the nodes parsed here, and it was created in the graph (not an
    input). Then nothing outside the rewritten site sees the writes, and the dead score nodes, writes
    included, are removed. q, k, v and the mask terms are read by SDPA where the original's matmul reads
    them; a write into their memory between the scores and the output matmul would change what SDPA reads,
    so it is refused.
    Rows with no allowed key are where kernels disagree, so the original's result is restored after
    SDPA: a row whose scores are all -inf is NaN in eager code (SDPA's kernels give 0), so where the
    mask may produce one (a -inf fill, an additive term not provably finite) such rows are set to NaN;
    a row whose float mask is all ``finfo.min`` absorbs every score and gets uniform weights in eager
    code, i.e. the mean of v (CUDA's efficient/cuDNN kernels give 0), so such rows get the mean of v.

When it refuses
    Anything else between the matmuls changes the math or cannot be carried: score soft-capping
    (``tanh(s / c) * c``), attention sinks (``cat`` of extra logits), a softmax over another dim,
    active dropout, probabilities used elsewhere (e.g. returned as attention weights), a replacement
    by another finite value, a scale that is not a constant, scores subtracted from something, an additive
    mask in another dtype than q, views other than a batch×heads split/merge, an in-place write into scores
    that something else also reads (or into a graph input, or through a view), a write into q, k, v or a
    mask term while the attention reads them, or q/k/v/output dtypes and shapes SDPA cannot take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from attnfx.backends.sdpa import SdpaInputs, predict_kernel
from attnfx.fx.graph import (SDPA, arg, emit, fake, is_tensor_node, known_eq, memory_of, numel_hint, op_name,
                             precedes, writes_in_place)
from attnfx.fx.sites import PROB_IDENTITIES, PROB_VIEWS, prob_matmul
from attnfx.patterns.base import Outcome, PassContext, Pattern, Refused, Site

_CASTS = frozenset({"to", "float", "half", "bfloat16", "type", "type_as", "contiguous"})
_VIEWS = frozenset({"reshape", "flatten", "unflatten"})
_FINITE_PRODUCERS = frozenset({"zeros", "ones", "zeros_like", "ones_like", "new_zeros", "new_ones", "full", "new_full",
                               "tensor", "scalar_tensor"})

# A mask term: a node, or ("not", term) — its negation —, or ("split", term) — a term of the (B·H, Q, K) scores
# seen in the (B, H, Q, K) space of a later view (``unflatten(0, (B, H))``).
Term = Any


@dataclass
class Scores:
    """The parsed score computation: q @ kᵀ, its scale, and the masking terms in order."""

    q: fx.Node
    kt: fx.Node
    scale: float = 1.0
    default_scale: bool = False  # a symbolic factor equal to 1/sqrt(head_dim): SDPA's default
    additive: list[tuple[Term, float]] = field(default_factory=list)  # (tensor, factor applied after it)
    excluded: list[Term] = field(default_factory=list)  # bool tensors, True = key excluded (-inf fill)
    min_filled: list[Term] = field(default_factory=list)  # bool tensors, True = replaced by finfo.min
    replaced: bool = False
    heads: tuple[Any, Any] | None = None  # (B, H) as a view spells them, when it split (B·H, Q, K) scores
    nodes: list[fx.Node] = field(default_factory=list)  # the score computation's nodes, bottom first
    bypassed: list[fx.Node] = field(default_factory=list)  # mask terms replaced by their input (``expand_as``)


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def parse_scores(node: fx.Node, reader: fx.Node) -> Scores:
    """Walk back from ``reader``'s operand ``node`` (first: the softmax input) to ``matmul(q, kᵀ)`` through the
    rules below; refuse anything else. What ``reader`` sees is ``node`` after its in-place writes before it."""
    node = _as_read(node, reader)
    rule = SCORE_RULES.get(op_name(node))
    if rule is None:
        raise Refused(f"scores pass through {op_name(node) or node.target} ({node.name}), which SDPA cannot carry")
    s = rule(node)
    s.nodes.append(node)
    return s


def _as_read(node: fx.Node, reader: fx.Node) -> fx.Node:
    """The node whose value ``reader`` reads as ``node``: the last in-place write into ``node`` (or into the result
    of such a write, which is ``node`` again) before ``reader`` — XLM: ``scores.masked_fill_(...)`` whose result
    is dropped, then ``softmax(scores)`` —, or ``node`` itself. Writes through views are not followed; whether
    the memory is the score computation's alone is checked once the scores are parsed (``_check_memory``)."""
    writes, frontier = [], [node]
    while frontier:
        x = frontier.pop()
        for u in x.users:
            if u is not reader and writes_in_place(u) and u.args and u.args[0] is x and precedes(u, reader):
                writes.append(u)
                frontier.append(u)
    return max(writes, key=_Later) if writes else node


def _matmul(node: fx.Node) -> Scores:
    return Scores(q=node.args[0], kt=node.args[1])


def _baddbmm(node: fx.Node) -> Scores:
    """baddbmm(M, q, kᵀ, beta, alpha) = beta * M + alpha * (q @ kᵀ)   (diffusers' get_attention_scores, Bloom's
    ``alibi.baddbmm(batch1=q, batch2=kᵀ, beta=1, alpha=1/√d)``)."""
    m, q, kt = arg(node, 0, "input"), arg(node, 1, "batch1"), arg(node, 2, "batch2")
    beta, alpha = _number(arg(node, 3, "beta", 1)), _number(arg(node, 4, "alpha", 1))
    if beta is None or alpha is None:
        raise Refused("baddbmm with non-constant beta/alpha")
    s = Scores(q=q, kt=kt, scale=alpha)
    if beta != 0:
        s.additive.append((m, beta))
    return s


def _cast(node: fx.Node) -> Scores:
    return parse_scores(node.args[0], node)


def _scale(node: fx.Node) -> Scores:
    """``scores * c`` / ``scores / c``: a constant factor, or exactly 1/√head_dim when symbolic."""
    name = op_name(node)
    a, b = node.args[0], node.args[1]
    if name == "div" and not is_tensor_node(a):
        raise Refused(f"scores are divided into a constant ({node.name})")
    tensor, c = (a, b) if is_tensor_node(a) else (b, a)
    s = parse_scores(tensor, node)
    if s.replaced:
        raise Refused("scores are scaled after masking")
    factor = _number(c)
    if factor is None:
        head_dim = fake(s.q).shape[-1]
        inv_sqrt = known_eq(fake(c), head_dim ** -0.5) if name == "mul" else known_eq(fake(c), head_dim ** 0.5)
        if not inv_sqrt or s.default_scale or s.scale != 1.0 or s.additive:
            raise Refused(f"scores are scaled by a non-constant ({node.name})")
        s.default_scale = True
        return s
    factor = factor if name == "mul" else 1.0 / factor
    if s.default_scale:
        raise Refused("scores are scaled by 1/sqrt(head_dim) and by another factor")
    s.scale *= factor
    s.additive = [(t, f * factor) for t, f in s.additive]
    return s


def _add(node: fx.Node) -> Scores:
    """``scores + mask`` (either operand order), or ``scores + number`` (softmax is shift-invariant per row)."""
    if len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:
        raise Refused("add with alpha")
    a, b = node.args[0], node.args[1]
    if not (is_tensor_node(a) and is_tensor_node(b)):
        return parse_scores(a if is_tensor_node(a) else b, node)
    errors = []
    for score, term in ((a, b), (b, a)):
        try:
            s = parse_scores(score, node)
        except Refused as e:
            errors.append(e)
            continue
        s.additive.append((term, 1.0))
        return s
    raise errors[0]


def _sub(node: fx.Node) -> Scores:
    """``scores - mask`` (an additive term with factor -1), or ``scores - number`` (a shift)."""
    if len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:
        raise Refused("sub with alpha")
    a, b = node.args[0], node.args[1]
    if not is_tensor_node(a):
        raise Refused(f"scores are subtracted from something ({node.name}): they change sign")
    s = parse_scores(a, node)
    if is_tensor_node(b):
        s.additive.append((b, -1.0))
    return s


def _fill(node: fx.Node) -> Scores:
    """``masked_fill(cond, fill)`` / ``where(cond, scores, fill)`` with fill -inf or ``finfo.min``."""
    if op_name(node) == "masked_fill":
        score, cond, fill = node.args[0], arg(node, 1, "mask"), arg(node, 2, "value")
        excluded_when = True
    else:
        cond, x, y = node.args[0], node.args[1], node.args[2]
        if is_tensor_node(x) and _number(y) is not None:
            score, fill, excluded_when = x, y, False
        elif is_tensor_node(y) and _number(x) is not None:
            score, fill, excluded_when = y, x, True
        else:
            raise Refused("where() between two tensors in the scores")
    value = _number(fill)
    s = parse_scores(score, node)
    dtype = fake(score).dtype
    cond_node = cond if excluded_when else ("not", cond)
    if value == -math.inf:
        s.excluded.append(cond_node)
    elif value is not None and dtype.is_floating_point and value == torch.finfo(dtype).min:
        s.min_filled.append(cond_node)
    else:
        raise Refused(f"scores replaced by {fill!r}: only -inf or finfo.min can become an SDPA mask exactly")
    s.replaced = True
    return s


def _view(node: fx.Node) -> Scores:
    """A view of the scores: the identity, or Bloom's split of (B·H, Q, K) into (B, H, Q, K)."""
    x = node.args[0]
    s = parse_scores(x, node)
    src, dst = fake(x).shape, fake(node).shape
    if _same_shape(src, dst):
        return s
    if not (_splits_batch_heads(src, dst) and s.heads is None):
        raise Refused(f"scores are reshaped from {_shape(src)} to {_shape(dst)} ({node.name}): only a split of "
                      "batch×heads into (batch, heads) can be carried")
    sizes = _split_sizes(node)
    if sizes is None:
        raise Refused(f"the view {node.name} splits batch×heads in a way that cannot be replayed on q, k and v")
    n = src[0]

    def split(term: Term) -> Term:
        """A term recorded in the (B·H, Q, K) space, as seen in the (B, H, Q, K) space."""
        if isinstance(term, tuple):
            return (term[0], split(term[1]))
        t = fake(term)
        if not isinstance(t, torch.Tensor) or t.dim() < 3 or known_eq(t.shape[-3], 1):
            return term  # broadcast over B·H: the same over (B, H)
        if t.dim() == 3 and known_eq(t.shape[0], n):
            return ("split", term)
        raise Refused(f"{term.name} of shape {_shape(t.shape)} is added to the (B·H, Q, K) scores before "
                      f"{node.name}: it cannot be split into (batch, heads)")

    s.additive = [(split(t) if is_tensor_node(t) else t, f) for t, f in s.additive]
    s.excluded = [split(c) for c in s.excluded]
    s.min_filled = [split(c) for c in s.min_filled]
    s.heads = sizes
    return s


def _soft_capping(node: fx.Node) -> Scores:
    raise Refused("score soft-capping (tanh) changes the math")


def _sinks(node: fx.Node) -> Scores:
    raise Refused("extra logits concatenated to the scores (attention sinks?)")


# the score computation, one rule per op (by normalised op name): what it contributes to ``Scores``
SCORE_RULES: dict[str, Callable[[fx.Node], Scores]] = {
    "matmul": _matmul, "baddbmm": _baddbmm, **dict.fromkeys(_CASTS, _cast), "mul": _scale, "div": _scale,
    "add": _add, "sub": _sub, "masked_fill": _fill, "where": _fill, **dict.fromkeys(_VIEWS, _view),
    "tanh": _soft_capping, "cat": _sinks,
}


def _shape(shape) -> tuple:
    return tuple(shape)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(known_eq(x, y) for x, y in zip(a, b))


def _splits_batch_heads(src, dst) -> bool:
    """(N, Q, K) -> (B, H, Q, K) with N = B·H."""
    return len(src) == 3 and len(dst) == 4 and known_eq(src[0], dst[0] * dst[1]) and _same_shape(src[1:], dst[2:])


def _merges_batch_heads(src, dst) -> bool:
    """(B, H, Q, K) -> (B·H, Q, K)."""
    return _splits_batch_heads(dst, src)


def _split_sizes(node: fx.Node) -> tuple[Any, Any] | None:
    """(B, H) as the splitting view spells them (ints, size nodes, or one -1), to replay it with ``unflatten``."""
    if op_name(node) == "unflatten":
        dim, sizes = arg(node, 1, "dim"), arg(node, 2, "sizes")
        return tuple(sizes) if dim == 0 and isinstance(sizes, (tuple, list)) and len(sizes) == 2 else None
    if op_name(node) != "reshape":
        return None
    sizes = list(node.args[1:]) or list(node.kwargs.get("shape", node.kwargs.get("size", ())))
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    if len(sizes) != 4 or (sizes[0] == -1 and sizes[1] == -1):
        return None
    return sizes[0], sizes[1]


def _leaf(term: Term) -> Any:
    while isinstance(term, tuple):
        term = term[1]
    return term


def _provably_finite(node: Any) -> bool:
    """True when an additive mask term cannot hold -inf (so rows with no key cannot appear)."""
    node = _leaf(node)
    if not isinstance(node, fx.Node):
        v = _number(node)
        return v is not None and math.isfinite(v)
    val = fake(node)
    if isinstance(val, torch.Tensor) and not val.dtype.is_floating_point:
        return True  # bool/int converted later: finite
    name = op_name(node) or (node.target if node.op == "call_method" else getattr(node.target, "__name__", ""))
    if name in ("where",):
        return _provably_finite(node.args[1]) and _provably_finite(node.args[2])
    if name == "masked_fill":
        return _provably_finite(node.args[0]) and _provably_finite(arg(node, 2, "value"))
    if name in ("getitem", "expand", "reshape", "contiguous", "clone", "unsqueeze", "permute", "transpose",
                "squeeze", "flatten"):
        return _provably_finite(node.args[0])
    if name in ("to", "float", "type"):
        src = fake(node.args[0])
        return isinstance(src, torch.Tensor) and (
            not src.dtype.is_floating_point
            or torch.finfo(val.dtype).max >= torch.finfo(src.dtype).max
        ) and _provably_finite(node.args[0])
    if name in _FINITE_PRODUCERS:
        if name in ("tensor", "scalar_tensor"):
            return _provably_finite(node.args[0]) if node.args else False
        fill = {"full": arg(node, 1, "fill_value"), "new_full": arg(node, 2, "fill_value")}.get(name, 0)
        return _provably_finite(fill)
    return False


def _term(graph: fx.Graph, t: Term, s: Scores, like: fx.Node) -> Any:
    """The value of a term in the space of the SDPA call."""
    if isinstance(t, tuple) and t[0] == "split":
        return emit(graph, "call_method", "unflatten", (_term(graph, t[1], s, like), 0, s.heads), like=like)
    if isinstance(t, tuple):
        return emit(graph, "call_function", torch.logical_not, (_term(graph, t[1], s, like),), like=like)
    if isinstance(t, fx.Node) and t.op == "call_method" and t.target == "expand_as" and t.args[1] in s.nodes:
        s.bypassed.append(t)
        return t.args[0]  # expanded to the scores' shape (XLM): SDPA broadcasts the mask the same way
    return t


def _cond(graph: fx.Graph, c: Term, s: Scores, like: fx.Node) -> fx.Node:
    """A bool node, True where the key is excluded/replaced."""
    c = _term(graph, c, s, like)
    if fake(c).dtype != torch.bool:
        return emit(graph, "call_method", "to", (c, torch.bool), like=like)
    return c


@dataclass
class Mask:
    """The SDPA attn_mask, and what the original computes on rows with no allowed key."""

    attn_mask: fx.Node | None = None
    allowed: fx.Node | None = None  # bool; a row with no True is NaN in eager code
    all_min: fx.Node | None = None  # bool (.., L, 1); a row entirely finfo.min gets uniform weights in eager code


def build_mask(graph: fx.Graph, s: Scores, dtype: torch.dtype, like: fx.Node) -> Mask:
    excluded = [_cond(graph, c, s, like) for c in s.excluded]
    excluded_any = None
    for c in excluded:
        excluded_any = c if excluded_any is None else emit(graph, "call_function", torch.logical_or,
                                                           (excluded_any, c), like=like)
    if not s.additive and not s.min_filled:
        if excluded_any is None:
            return Mask()
        allowed = emit(graph, "call_function", torch.logical_not, (excluded_any,), like=like)
        return Mask(allowed, allowed)
    total = None
    for term, factor in s.additive:
        term = _term(graph, term, s, like)
        if factor != 1.0:
            term = emit(graph, "call_function", torch.mul, (term, factor), like=like)
        total = term if total is None else emit(graph, "call_function", torch.add, (total, term), like=like)
    for c in s.min_filled:
        cond = _cond(graph, c, s, like)
        filled = emit(graph, "call_function", torch.where,
                      (cond, torch.finfo(dtype).min, 0.0), like=like)
        filled = emit(graph, "call_method", "to", (filled, dtype), like=like)
        total = filled if total is None else emit(graph, "call_function", torch.add, (total, filled), like=like)
    if excluded_any is not None:
        total = emit(graph, "call_method", "masked_fill", (total, excluded_any, -math.inf), like=like)
    maybe_inf = excluded_any is not None or len(s.additive) + len(s.min_filled) > 1 or not all(
        _provably_finite(t) for t, _ in s.additive)
    allowed = emit(graph, "call_function", torch.gt, (total, -math.inf), like=like) if maybe_inf else None
    is_min = emit(graph, "call_function", torch.eq, (total, torch.finfo(dtype).min), like=like)
    all_min = emit(graph, "call_method", "all", (is_min, -1), {"keepdim": True}, like=like)
    return Mask(total, allowed, all_min)


def _check_memory(s: Scores, softmax: fx.Node, pv: fx.Node) -> None:
    """In-place writes: the scores' own memory is touched by the parsed nodes alone, and nothing writes into
    q, k, v or a mask term while the attention reads them (see the docstring)."""
    parsed = set(s.nodes) | {softmax}
    for node in s.nodes:
        members = memory_of(node)
        writers = [u for m in members for u in m.users if writes_in_place(u) and u.args and u.args[0] in members]
        if not writers:
            continue
        outside = next((w for w in writers if w not in parsed), None)
        if outside is not None:
            raise Refused(f"the scores {node.name} are written in place by {outside.name}, which this rewrite "
                          "cannot follow")
        first = min(writers, key=_Later)  # a reader before every write sees the value the writes leave alone
        reader = next((u for m in members for u in m.users if u not in parsed and u not in members
                       and not precedes(u, first) and _reads_values(u, m)), None)
        if reader is not None:
            raise Refused(f"the scores {node.name} are written in place ({writers[0].name}) and also read by "
                          f"{reader.name}")
        base = next(m for m in members if not any(m in u.users for u in members))
        if base.op not in ("call_function", "call_method") or not isinstance(fake(base), torch.Tensor):
            raise Refused(f"the scores {node.name} are written in place into {base.name}, which this graph did "
                          "not create")
    start = s.nodes[0]
    leaves = [s.q, s.kt, pv.args[1], *(_leaf(t) for t, _ in s.additive), *(_leaf(c) for c in s.excluded),
              *(_leaf(c) for c in s.min_filled)]
    for leaf in leaves:
        if not isinstance(leaf, fx.Node):
            continue
        members = memory_of(leaf)
        for m in members:
            for u in m.users:
                if (writes_in_place(u) and u.args and u.args[0] in members and precedes(start, u)
                        and precedes(u, pv)):
                    raise Refused(f"{leaf.name} is written in place ({u.name}) while the attention reads it")


# methods that read only the shape/dtype of their second operand (``x.type_as(scores)``, ``m.expand_as(scores)``)
_METADATA_OF_OTHER = frozenset({"type_as", "expand_as", "view_as", "reshape_as"})


def _reads_values(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads the values of ``node`` (not only its shape or dtype)."""
    if user.op == "call_method" and user.target in _METADATA_OF_OTHER and user.args[0] is not node:
        return False
    return not (user.op == "call_method" and user.target in ("size", "dim", "stride"))


def _size(graph: fx.Graph, value: Any, node: fx.Node, dim: int, like: fx.Node) -> Any:
    """A size as a graph value: the int when static, else ``node.size(dim)``."""
    if isinstance(value, int):
        return value
    return emit(graph, "call_method", "size", (node, dim), like=like)


def rewrite(site: Site, ctx: PassContext) -> Outcome:
    softmax = site.node
    scores = fake(softmax.args[0])
    dim = arg(softmax, 1, "dim")
    if dim is None or dim not in (-1, scores.dim() - 1):
        raise Refused(f"softmax over dim {dim}, not over the keys")
    pv = prob_matmul(softmax)
    # every node between softmax and pv: used once, and the identity in this call (or a batch×heads merge)
    n, merge, chain = softmax, None, []
    while n is not pv.args[0]:
        if len(n.users) != 1:
            raise Refused(f"attention probabilities ({n.name}) are also used elsewhere (returned as weights?)")
        n = next(iter(n.users))
        chain.append(n)
        name = op_name(n)
        if name == "dropout":
            p, training = arg(n, 1, "p", 0.5), arg(n, 2, "training", True)
            if not (p == 0 or training is False):
                raise Refused(f"dropout p={p} is active (training); the result is random")
        elif name in PROB_VIEWS:
            src, dst = fake(n.args[0]).shape, fake(n).shape
            if _merges_batch_heads(src, dst) and merge is None:
                merge = (src[0], src[1])
            elif not _same_shape(src, dst):
                raise Refused(f"probabilities are reshaped from {_shape(src)} to {_shape(dst)} ({n.name}): only a "
                              "merge of (batch, heads) into batch×heads can be carried")
        elif name not in PROB_IDENTITIES:
            raise Refused(f"probabilities pass through {name} ({n.name}) before the matmul (attention sinks?)")
    if len(n.users) != 1:
        raise Refused(f"attention probabilities ({n.name}) are also used elsewhere (returned as weights?)")

    s = parse_scores(softmax.args[0], softmax)
    _check_memory(s, softmax, pv)
    q_node, kt_node, v_node = s.q, s.kt, pv.args[1]
    q, kt, v, out = fake(q_node), fake(kt_node), fake(v_node), fake(pv)
    if not all(isinstance(t, torch.Tensor) for t in (q, kt, v)):
        raise Refused("q, k or v is not a tensor")
    if len({q.dtype, kt.dtype, v.dtype, out.dtype}) != 1:
        raise Refused(f"q/k/v/output dtypes differ ({q.dtype}, {kt.dtype}, {v.dtype} -> {out.dtype})")
    # batch×heads views: q/k (below a split) and v (after a merge) are seen in the (B, H, ...) space
    heads = fake(softmax).shape[:2] if (s.heads is not None or merge is not None) else None
    if merge is not None and heads is not None and not _same_shape(merge, heads):
        raise Refused("the views before and after the softmax split and merge batch×heads differently")
    if s.heads is not None and not (q.dim() == kt.dim() == 3):
        raise Refused("a batch×heads split of scores whose q or k is not (batch×heads, L, D)")
    if merge is not None and v.dim() != 3:
        raise Refused("a batch×heads merge of probabilities whose v is not (batch×heads, S, D)")
    if merge is not None and s.heads is None and not (q.dim() == 4 and _same_shape(q.shape[:2], merge)):
        raise Refused("a batch×heads merge of probabilities whose (batch, heads) are not q's")
    q_shape = (*heads, *q.shape[1:]) if s.heads is not None else tuple(q.shape)
    kt_shape = (*heads, *kt.shape[1:]) if s.heads is not None else tuple(kt.shape)
    v_shape = (*heads, *v.shape[1:]) if merge is not None else tuple(v.shape)
    if not (len(q_shape) == len(kt_shape) == len(v_shape) and len(q_shape) >= 3):
        raise Refused("q, k and v must have the same rank >= 3 for SDPA")
    lead_q, lead_k, lead_v = q_shape[:-3], kt_shape[:-3], v_shape[:-3]
    if not all(known_eq(a, b) and known_eq(a, c) for a, b, c in zip(lead_q, lead_k, lead_v)):
        raise Refused("batch dims of q, k, v differ (broadcasting matmul)")
    hq, hk, hv = q_shape[-3], kt_shape[-3], v_shape[-3]
    gqa = not known_eq(hq, hk)
    if not known_eq(hk, hv) or (gqa and not known_eq(hk, 1)):
        raise Refused("head counts of q, k, v differ in a way SDPA cannot take")
    for t, _ in s.additive:
        t = _leaf(t)
        if not is_tensor_node(t):
            continue
        if fake(t).dtype != q.dtype:
            raise Refused(f"additive mask {t.name} is {fake(t).dtype} while q is {q.dtype}")

    graph = softmax.graph
    with graph.inserting_before(pv):
        split = s.heads
        if split is None and merge is not None:  # the merge's (B, H) are q's leading dims
            split = tuple(_size(graph, d, q_node, i, pv) for i, d in enumerate(merge))
        kt_name = op_name(kt_node)
        if kt_name == "transpose" and {_norm(kt_node.args[1], kt.dim()), _norm(kt_node.args[2], kt.dim())} == {
                kt.dim() - 1, kt.dim() - 2}:
            k_node = kt_node.args[0]
            if s.heads is not None:
                k_node = emit(graph, "call_method", "unflatten", (k_node, 0, split), like=pv)
        else:
            k_node = kt_node
            if s.heads is not None:
                k_node = emit(graph, "call_method", "unflatten", (k_node, 0, split), like=pv)
            k_node = emit(graph, "call_method", "transpose", (k_node, -2, -1), like=pv)
        if s.heads is not None:
            q_node = emit(graph, "call_method", "unflatten", (q_node, 0, split), like=pv)
        if merge is not None:
            v_node = emit(graph, "call_method", "unflatten", (v_node, 0, split), like=pv)
        mask = build_mask(graph, s, q.dtype, like=pv)
        kwargs = {"attn_mask": mask.attn_mask, "dropout_p": 0.0, "is_causal": False,
                  "scale": None if s.default_scale else s.scale}
        if gqa:
            kwargs["enable_gqa"] = True
        attn = emit(graph, "call_function", SDPA, (q_node, k_node, v_node), kwargs, like=pv)
        result = attn
        if mask.all_min is not None:  # eager: uniform weights, i.e. the mean of v over the keys
            mean_v = emit(graph, "call_method", "mean", (v_node, -2), {"keepdim": True}, like=pv)
            result = emit(graph, "call_function", torch.where, (mask.all_min, mean_v, result), like=pv)
        if mask.allowed is not None:  # eager: softmax of an all -inf row is NaN
            empty = emit(graph, "call_method", "any", (mask.allowed, -1), {"keepdim": True}, like=pv)
            empty = emit(graph, "call_function", torch.logical_not, (empty,), like=pv)
            result = emit(graph, "call_method", "masked_fill", (result, empty, math.nan), like=pv)
        if merge is not None:
            result = emit(graph, "call_method", "flatten", (result, 0, 1), like=pv)
    if not all(known_eq(a, b) for a, b in zip(fake(result).shape, out.shape)) or fake(result).dim() != out.dim():
        raise AssertionError("manual_attention built an output of the wrong shape")  # never silently wrong
    pv.replace_all_uses_with(result)
    inputs_left = _erase_site(pv, chain, softmax, [*s.nodes, *s.bypassed])
    notes = "; ".join(n for n, on in (
        ("rows whose mask is all -inf are set to NaN, as the original computes", mask.allowed is not None),
        ("rows whose mask is all finfo.min get the mean of v, as the original computes", mask.all_min is not None),
    ) if on) or None
    inputs = SdpaInputs.from_fakes(fake(q_node), fake(k_node), fake(v_node),
                                   None if mask.attn_mask is None else fake(mask.attn_mask), scale=kwargs["scale"])
    kernel = predict_kernel(inputs, enable_gqa=gqa)
    saved = 0
    if kernel is not None and kernel != "sdpa.math":  # a fused kernel never materializes scores/probabilities
        saved = sum(numel_hint(t) * t.element_size() for t in (scores, fake(softmax)))
    return Outcome(
        reason=notes, target="F.scaled_dot_product_attention", node=attn, output=result, replaced=inputs_left,
        details={"scale": "1/sqrt(head_dim)" if s.default_scale else s.scale, "sdpa_kernel": kernel or "unknown"},
        savings={"score_matrix_bytes": saved},
    )


def _erase_site(pv: fx.Node, chain: list[fx.Node], softmax: fx.Node, score_nodes: list[fx.Node]) -> list[fx.Node]:
    """Remove the original attention once nothing reads it: the output matmul, the probabilities (and mask terms
    the SDPA call no longer reads) and the score nodes — in-place writes included, since their memory belongs to
    the scores alone (``_check_memory``). Returns what the removed nodes read (they may now be dead too)."""
    graph = pv.graph
    erased, inputs = set(), set()
    for n in [pv, *reversed(chain), softmax, *sorted(set(score_nodes), key=_Later, reverse=True)]:
        if n not in erased and not n.users:
            inputs.update(n.all_input_nodes)
            graph.erase_node(n)
            erased.add(n)
    return [n for n in inputs if n not in erased]


class _Later:
    """Sort key: graph order."""

    def __init__(self, node: fx.Node):
        self.node = node

    def __lt__(self, other: _Later) -> bool:
        return precedes(self.node, other.node)


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


PATTERN = Pattern("manual_attention", rewrite, applies_to="manual")
