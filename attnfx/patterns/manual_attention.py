"""manual_attention — ``softmax(q @ kᵀ · scale + mask) @ v`` written by hand becomes one SDPA call.

What it matches
    A softmax over the last dim whose probabilities (through dtype casts and an inactive dropout)
    are the left operand of ``matmul(P, v)``, and whose scores are ``matmul(q, kᵀ)`` followed by any
    of: multiplication/division by a constant (scale), ``+ tensor`` (additive mask or bias, e.g. HF
    eager's ``where(bool, 0, finfo.min)``), ``+ number``, ``masked_fill(cond, fill)`` /
    ``where(cond, scores, fill)`` with fill -inf or ``finfo(dtype).min``, and dtype casts — the way
    eager code writes it (HF ``eager_attention_forward``: float32 softmax then ``.to(q.dtype)``;
    diffusers' ``baddbmm(mask, q, kᵀ, beta, alpha)`` then ``bmm``). The scale may be symbolic when
    it is exactly 1/√head_dim (``/ q.size(-1) ** 0.5`` under dynamic shapes).

Why the rewrite is exact
    SDPA computes ``softmax(q @ kᵀ · scale + attn_mask) @ v`` with the softmax in float32:
      * the scale is the product of the constant factors, passed explicitly (SDPA's default would
        be 1/√d), or SDPA's default when the factor is provably 1/√head_dim; an additive term met
        before a later factor is multiplied by that factor; baddbmm's beta scales its mask;
      * additive tensors become a float ``attn_mask`` (their sum, in the order they were added);
      * a replacement by -inf excludes the key: a bool mask, True = attend;
      * a replacement by ``finfo.min`` equals adding ``finfo.min`` (|score| ≪ 10³⁰ is absorbed by
        rounding);
      * a ``+ number`` shifts a whole row: softmax ignores it;
      * dropout with p = 0 or ``training=False`` is the identity.
    Rows with no allowed key are where kernels disagree, so the original's result is restored after
    SDPA: a row whose scores are all -inf is NaN in eager code (SDPA's kernels give 0), so where the
    mask may produce one (a -inf fill, an additive term not provably finite) such rows are set to NaN;
    a row whose float mask is all ``finfo.min`` absorbs every score and gets uniform weights in eager
    code, i.e. the mean of v (CUDA's efficient/cuDNN kernels give 0), so such rows get the mean of v.

When it refuses
    Anything else between the matmuls changes the math or cannot be carried: score soft-capping
    (``tanh(s / c) * c``), attention sinks (``cat`` of extra logits), a softmax over another dim,
    active dropout, probabilities used elsewhere (e.g. returned as attention weights), a replacement
    by another finite value, a scale that is not a constant, an additive mask in another dtype
    than q, or q/k/v/output dtypes and shapes SDPA cannot take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from attnfx.backends.sdpa import SdpaInputs, predict_kernel
from attnfx.fx.graph import SDPA, arg, emit, fake, is_tensor_node, known_eq, numel_hint, op_name
from attnfx.fx.sites import PROB_IDENTITIES, prob_matmul
from attnfx.patterns.base import Outcome, PassContext, Pattern, Refused, Site

_CASTS = frozenset({"to", "float", "half", "bfloat16", "type", "type_as", "contiguous"})
_FINITE_PRODUCERS = frozenset({"zeros", "ones", "zeros_like", "ones_like", "new_zeros", "new_ones", "full", "new_full",
                               "tensor", "scalar_tensor"})


@dataclass
class Scores:
    """The parsed score computation: q @ kᵀ, its scale, and the masking terms in order."""

    q: fx.Node
    kt: fx.Node
    scale: float = 1.0
    default_scale: bool = False  # a symbolic factor equal to 1/sqrt(head_dim): SDPA's default
    additive: list[tuple[fx.Node, float]] = field(default_factory=list)  # (tensor, factor applied after it)
    excluded: list[fx.Node] = field(default_factory=list)  # bool tensors, True = key excluded (-inf fill)
    min_filled: list[fx.Node] = field(default_factory=list)  # bool tensors, True = replaced by finfo.min
    replaced: bool = False


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def parse_scores(node: fx.Node) -> Scores:
    """Walk back from the softmax input to ``matmul(q, kᵀ)`` through the rules below; refuse anything else."""
    rule = SCORE_RULES.get(op_name(node))
    if rule is None:
        raise Refused(f"scores pass through {op_name(node) or node.target} ({node.name}), which SDPA cannot carry")
    return rule(node)


def _matmul(node: fx.Node) -> Scores:
    return Scores(q=node.args[0], kt=node.args[1])


def _baddbmm(node: fx.Node) -> Scores:
    """baddbmm(M, q, kᵀ, beta, alpha) = beta * M + alpha * (q @ kᵀ)   (diffusers' get_attention_scores)."""
    m, q, kt = node.args[0], node.args[1], node.args[2]
    beta, alpha = _number(arg(node, 3, "beta", 1)), _number(arg(node, 4, "alpha", 1))
    if beta is None or alpha is None:
        raise Refused("baddbmm with non-constant beta/alpha")
    s = Scores(q=q, kt=kt, scale=alpha)
    if beta != 0:
        s.additive.append((m, beta))
    return s


def _cast(node: fx.Node) -> Scores:
    return parse_scores(node.args[0])


def _scale(node: fx.Node) -> Scores:
    """``scores * c`` / ``scores / c``: a constant factor, or exactly 1/√head_dim when symbolic."""
    name = op_name(node)
    a, b = node.args[0], node.args[1]
    if name == "div" and not is_tensor_node(a):
        raise Refused(f"scores are divided into a constant ({node.name})")
    tensor, c = (a, b) if is_tensor_node(a) else (b, a)
    s = parse_scores(tensor)
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
        return parse_scores(a if is_tensor_node(a) else b)
    errors = []
    for score, term in ((a, b), (b, a)):
        try:
            s = parse_scores(score)
        except Refused as e:
            errors.append(e)
            continue
        s.additive.append((term, 1.0))
        return s
    raise errors[0]


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
    s = parse_scores(score)
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


def _soft_capping(node: fx.Node) -> Scores:
    raise Refused("score soft-capping (tanh) changes the math")


def _sinks(node: fx.Node) -> Scores:
    raise Refused("extra logits concatenated to the scores (attention sinks?)")


# the score computation, one rule per op (by normalised op name): what it contributes to ``Scores``
SCORE_RULES: dict[str, Callable[[fx.Node], Scores]] = {
    "matmul": _matmul, "baddbmm": _baddbmm, **dict.fromkeys(_CASTS, _cast), "mul": _scale, "div": _scale,
    "add": _add, "masked_fill": _fill, "where": _fill, "tanh": _soft_capping, "cat": _sinks,
}


def _provably_finite(node: Any) -> bool:
    """True when an additive mask term cannot hold -inf (so rows with no key cannot appear)."""
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


def _cond(graph: fx.Graph, c: Any, like: fx.Node) -> fx.Node:
    """A bool node, True where the key is excluded/replaced."""
    if isinstance(c, tuple):
        return emit(graph, "call_function", torch.logical_not, (_cond(graph, c[1], like),), like=like)
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
    excluded = [_cond(graph, c, like) for c in s.excluded]
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
        if factor != 1.0:
            term = emit(graph, "call_function", torch.mul, (term, factor), like=like)
        total = term if total is None else emit(graph, "call_function", torch.add, (total, term), like=like)
    for c in s.min_filled:
        cond = _cond(graph, c, like)
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


def rewrite(site: Site, ctx: PassContext) -> Outcome:
    softmax = site.node
    scores = fake(softmax.args[0])
    dim = arg(softmax, 1, "dim")
    if dim is None or dim not in (-1, scores.dim() - 1):
        raise Refused(f"softmax over dim {dim}, not over the keys")
    pv = prob_matmul(softmax)
    # every node between softmax and pv: used once, and the identity in this call
    n = softmax
    while n is not pv.args[0]:
        if len(n.users) != 1:
            raise Refused(f"attention probabilities ({n.name}) are also used elsewhere (returned as weights?)")
        n = next(iter(n.users))
        if op_name(n) == "dropout":
            p, training = arg(n, 1, "p", 0.5), arg(n, 2, "training", True)
            if not (p == 0 or training is False):
                raise Refused(f"dropout p={p} is active (training); the result is random")
        elif op_name(n) not in PROB_IDENTITIES:
            raise Refused(f"probabilities pass through {op_name(n)} ({n.name}) before the matmul (attention sinks?)")
    if len(n.users) != 1:
        raise Refused(f"attention probabilities ({n.name}) are also used elsewhere (returned as weights?)")

    s = parse_scores(softmax.args[0])
    q_node, kt_node = s.q, s.kt
    v_node = pv.args[1]
    q, kt, v, out = fake(q_node), fake(kt_node), fake(v_node), fake(pv)
    if not all(isinstance(t, torch.Tensor) for t in (q, kt, v)):
        raise Refused("q, k or v is not a tensor")
    if len({q.dtype, kt.dtype, v.dtype, out.dtype}) != 1:
        raise Refused(f"q/k/v/output dtypes differ ({q.dtype}, {kt.dtype}, {v.dtype} -> {out.dtype})")
    if not (q.dim() == kt.dim() == v.dim() and q.dim() >= 3):
        raise Refused("q, k and v must have the same rank >= 3 for SDPA")
    lead_q, lead_k, lead_v = q.shape[:-3], kt.shape[:-3], v.shape[:-3]
    if not all(known_eq(a, b) and known_eq(a, c) for a, b, c in zip(lead_q, lead_k, lead_v)):
        raise Refused("batch dims of q, k, v differ (broadcasting matmul)")
    hq, hk, hv = q.shape[-3], kt.shape[-3], v.shape[-3]
    gqa = not known_eq(hq, hk)
    if not known_eq(hk, hv) or (gqa and not known_eq(hk, 1)):
        raise Refused("head counts of q, k, v differ in a way SDPA cannot take")
    for t, _ in s.additive:
        if not is_tensor_node(t):
            continue
        if fake(t).dtype != q.dtype:
            raise Refused(f"additive mask {t.name} is {fake(t).dtype} while q is {q.dtype}")

    graph = softmax.graph
    with graph.inserting_before(pv):
        kt_name = op_name(kt_node)
        if kt_name == "transpose" and {_norm(kt_node.args[1], kt.dim()), _norm(kt_node.args[2], kt.dim())} == {
                kt.dim() - 1, kt.dim() - 2}:
            k_node = kt_node.args[0]
        else:
            k_node = emit(graph, "call_method", "transpose", (kt_node, -2, -1), like=pv)
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
    if not all(known_eq(a, b) for a, b in zip(fake(result).shape, out.shape)) or fake(result).dim() != out.dim():
        raise AssertionError("manual_attention built an output of the wrong shape")  # never silently wrong
    pv.replace_all_uses_with(result)
    notes = "; ".join(n for n, on in (
        ("rows whose mask is all -inf are set to NaN, as the original computes", mask.allowed is not None),
        ("rows whose mask is all finfo.min get the mean of v, as the original computes", mask.all_min is not None),
    ) if on) or None
    inputs = SdpaInputs.from_fakes(q, fake(k_node), v, None if mask.attn_mask is None else fake(mask.attn_mask),
                                   scale=kwargs["scale"])
    kernel = predict_kernel(inputs, enable_gqa=gqa)
    saved = 0
    if kernel is not None and kernel != "sdpa.math":  # a fused kernel never materializes scores/probabilities
        saved = sum(numel_hint(fake(t)) * fake(t).element_size() for t in (softmax.args[0], softmax))
    return Outcome(
        reason=notes, target="F.scaled_dot_product_attention", node=attn, output=result,
        replaced=[pv], details={"scale": "1/sqrt(head_dim)" if s.default_scale else s.scale,
                                "sdpa_kernel": kernel or "unknown"},
        savings={"score_matrix_bytes": saved},
    )


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


PATTERN = Pattern("manual_attention", rewrite, applies_to="manual")
