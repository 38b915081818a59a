"""The FX toolkit: small helpers over the graphs Dynamo captures. It knows nothing of the patterns that use it.

Dynamo keeps the user's spelling: ``x.reshape(...)`` is a ``call_method`` node, ``torch.reshape(x, ...)``
a ``call_function`` node, ``x @ y`` an ``operator.matmul`` node. Patterns should not care, so every
node gets one normalised *op name* (``"reshape"``, ``"matmul"``, ...) and its tensor operand first.
Every tensor-valued node carries ``meta["example_value"]``, a FakeTensor (possibly with symbolic
sizes); new nodes get one too, so later passes can read shapes the same way.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.symbolic_convert import InstructionTranslator
from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings, statically_known_true

SDPA = torch._C._nn.scaled_dot_product_attention
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

# call_function targets -> the method name they are equivalent to (tensor operand first).
_FUNCTION_OPS: dict[Any, str] = {
    torch.reshape: "reshape",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.swapdims: "transpose",
    torch.unsqueeze: "unsqueeze",
    torch.flatten: "flatten",
    torch.repeat_interleave: "repeat_interleave",
    torch.clone: "clone",
    operator.getitem: "getitem",
    torch.matmul: "matmul",
    operator.matmul: "matmul",
    torch.bmm: "matmul",
    torch.baddbmm: "baddbmm",
    torch.softmax: "softmax",
    F.softmax: "softmax",
    torch.nn.functional.dropout: "dropout",
    torch.dropout: "dropout",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    # in-place operators (``x += y``, ``x *= c``...): the same op, writing into x (``writes_in_place``)
    operator.iadd: "add",
    operator.isub: "sub",
    operator.imul: "mul",
    operator.itruediv: "div",
    torch.where: "where",
    torch.masked_fill: "masked_fill",
    torch.tanh: "tanh",
    torch.cat: "cat",
    SDPA: "sdpa",
}
_METHOD_ALIASES = {
    "view": "reshape",
    "swapaxes": "transpose",
    "swapdims": "transpose",
    "bmm": "matmul",
    "__matmul__": "matmul",
    "masked_fill_": "masked_fill",
    "add_": "add",
    "sub_": "sub",
    "mul_": "mul",
    "div_": "div",
    "__mul__": "mul",
    "__truediv__": "div",
    "__add__": "add",
    "__sub__": "sub",
    "__iadd__": "add",
    "__isub__": "sub",
    "__imul__": "mul",
    "__itruediv__": "div",
}


def op_name(node: fx.Node) -> str | None:
    """The normalised op a node performs, or None for placeholders/outputs/unknown functions."""
    if node.op == "call_method":
        return _METHOD_ALIASES.get(node.target, node.target)
    if node.op == "call_function":
        return _FUNCTION_OPS.get(node.target)
    return None


def call_name(node: fx.Node) -> str:
    """The name of what a node calls, normalised where known (``op_name``), raw otherwise ("" for non-calls)."""
    if node.op not in ("call_function", "call_method"):
        return ""
    return op_name(node) or str(node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target))


# ops whose result may share memory with their first operand: an in-place write through one changes the other
ALIASING_OPS = frozenset({"getitem", "view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand",
                          "narrow", "select", "as_strided", "diagonal", "t", "flatten", "unflatten", "view_as",
                          "expand_as", "contiguous"})


def aliases_input(node: fx.Node) -> bool:
    return call_name(node) in ALIASING_OPS and bool(node.args) and isinstance(node.args[0], fx.Node)


def fake(node: Any) -> Any:
    """The example value (FakeTensor, SymInt, python value) a node or constant stands for."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def is_tensor_node(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(fake(node), torch.Tensor)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument ``name`` (position ``index``) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def sdpa_args(node: fx.Node) -> dict[str, Any]:
    """All arguments of an SDPA call, by name, defaults filled in."""
    out = dict(SDPA_DEFAULTS)
    for name, value in zip(SDPA_ARGS, node.args):
        out[name] = value
    out.update(node.kwargs)
    return out


def set_sdpa_args(node: fx.Node, args: dict[str, Any]) -> None:
    """Write SDPA arguments back in one spelling: q, k, v positional, the rest by keyword."""
    node.args = (args["query"], args["key"], args["value"])
    node.kwargs = {k: args[k] for k in SDPA_ARGS[3:] if k in args and (args[k] is not SDPA_DEFAULTS[k] or k == "scale")}


# ---------------------------------------------------------------------------------------------
# symbolic sizes


def known_eq(a: Any, b: Any) -> bool:
    """True when a == b holds for every value of the symbols (never adds a guard)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - exotic sympy failure: be conservative
        return False


def known_one(a: Any) -> bool:
    return known_eq(a, 1)


def hint(x: Any) -> int:
    """A concrete value for a (possibly symbolic) size, without guarding: the traced example's."""
    if isinstance(x, torch.SymInt):
        node = x.node
        h = getattr(node, "hint", None)
        if h is not None:
            return int(h)
        return int(node.shape_env.size_hint(node.expr))
    return int(x)


def numel_hint(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape:
        n *= hint(s)
    return n


# ---------------------------------------------------------------------------------------------
# editing


def fake_mode_of(graph: fx.Graph):
    for node in graph.nodes:
        val = fake(node)
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    return None


def _to_fake(x: Any) -> Any:
    return fake(x) if isinstance(x, fx.Node) else x


def emit(
    graph: fx.Graph,
    op: str,
    target: Any,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    like: fx.Node | None = None,
    name: str | None = None,
) -> fx.Node:
    """Create a node at the graph's current insertion point, with a FakeTensor example value.

    ``like`` lends its provenance (stack trace, module stack) so reports and Inductor's
    provenance still point at the user's code.
    """
    kwargs = kwargs or {}
    node = graph.create_node(op, target, tuple(args), kwargs, name=name)
    if like is not None:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "attnfx_site"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    fargs = torch.fx.node.map_aggregate(tuple(args), _to_fake)
    fkwargs = torch.fx.node.map_aggregate(kwargs, _to_fake)
    mode = fake_mode_of(graph)
    try:
        with mode if mode is not None else contextlib.nullcontext():
            if op == "call_method":
                value = getattr(fargs[0], target)(*fargs[1:], **fkwargs)
            else:
                value = target(*fargs, **fkwargs)
    except Exception as exc:  # the rewrite built something ill-typed: never let it through silently
        graph.erase_node(node)
        raise Refused(f"rewrite could not be built ({target}: {exc})") from exc
    node.meta["example_value"] = value
    shape_env = getattr(mode, "shape_env", None)
    if getattr(shape_env, "pending_fresh_unbacked_symbols", None):
        # a data-dependent size (masked_select & co.): bind its new symbol to this node, as Dynamo does
        bindings = compute_unbacked_bindings(shape_env, value)
        if bindings:
            node.meta["unbacked_bindings"] = bindings
    return node


class Refused(Exception):
    """A rewrite that must not, or cannot, be made: the site stays as it was and ``reason`` is reported.

    The one way a pattern says no (also raised by :func:`emit` when a rewrite builds something ill-typed).
    ``details`` go to the site's record."""

    def __init__(self, reason: str, **details: Any):
        super().__init__(reason)
        self.reason, self.details = reason, details


_INPLACE_OPS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift",
                "rshift")
_SIDE_EFFECTS = frozenset({operator.setitem, *(getattr(operator, f"i{op}") for op in _INPLACE_OPS)})
_INPLACE_DUNDERS = frozenset(f"__i{op}__" for op in _INPLACE_OPS)


def writes_in_place(node: fx.Node) -> bool:
    """Whether a call writes into one of its operands: ``x.add_(y)``, ``x[i] = y``, ``x += y``, ``out=``.
    (``operator.and_``/``or_`` are the plain ``&``/``|``, not in-place ones.)"""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in _SIDE_EFFECTS or "out" in node.kwargs:
        return True
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return False
    name = str(node.target if node.op == "call_method" else getattr(node.target, "__name__", ""))
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))


# ops that may return their operand itself (a cast to the dtype it has, dropout in eval, an in-place op's result)
MAY_RETURN_INPUT = frozenset({"to", "float", "half", "bfloat16", "double", "type", "type_as", "dropout", "detach"})


def _may_alias_input(node: fx.Node) -> bool:
    return bool(node.args) and isinstance(node.args[0], fx.Node) and (
        aliases_input(node) or call_name(node) in MAY_RETURN_INPUT or writes_in_place(node))


def memory_of(node: fx.Node) -> set[fx.Node]:
    """Every node whose value may share memory with ``node``: from the node whose memory it is (through views,
    casts that may return their input, in-place ops, which return their operand), everything viewing, casting
    or writing in place from there. Writers that return nothing (``x[i] = y``) are users of a member."""
    base = node
    while _may_alias_input(base):
        base = base.args[0]
    members, frontier = {base}, [base]
    while frontier:
        for user in frontier.pop().users:
            if user not in members and _may_alias_input(user) and user.args[0] in members:
                members.add(user)
                frontier.append(user)
    return members


def precedes(a: fx.Node, b: fx.Node) -> bool:
    """Whether ``a`` comes before ``b`` in their graph."""
    try:
        return bool(a < b)  # torch.fx keeps an order key on nodes
    except TypeError:  # pragma: no cover - torch without ordered nodes: walk forward
        n = a.next
        while n.op != "root":
            if n is b:
                return True
            n = n.next
        return False


def alias_root(node: fx.Node) -> fx.Node:
    """The node whose memory ``node`` views (itself when it is no view)."""
    while aliases_input(node):
        node = node.args[0]
    return node


def written_roots(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose memory the graph writes in place, directly or through views."""
    return {alias_root(n.args[0]) for n in graph.nodes
            if writes_in_place(n) and n.args and isinstance(n.args[0], fx.Node)}


def mutated_inputs(graph: fx.Graph) -> set[int]:
    """Indices of placeholders that the graph writes to in place (through views)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return {placeholders.index(root) for root in written_roots(graph) if root.op == "placeholder"}


def is_pure(node: fx.Node) -> bool:
    """Whether erasing an unused node cannot change what the graph does: no in-place or effectful op."""
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    return not writes_in_place(node)


def erase_unused(nodes: Iterable[fx.Node]) -> int:
    """Erase the given nodes, and what only they used, where unused and pure. Returns the count.

    Deliberately not ``graph.eliminate_dead_code()``: Dynamo graphs hold in-place ``call_method``
    nodes (``cache.index_copy_(...)``) whose results nobody reads, and those must stay.
    """
    stack = list(nodes)
    erased = 0
    while stack:
        node = stack.pop()
        if getattr(node, "_erased", False) or node.users or not is_pure(node):
            continue
        inputs = [n for n in node.all_input_nodes]
        node.graph.erase_node(node)
        erased += 1
        stack.extend(inputs)
    return erased


def replace_call(node: fx.Node, target: Any, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> fx.Node:
    """A call of ``target`` in ``node``'s place: the same position, metadata (provenance, example value) and
    users; ``node`` is erased. For swapping one attention call for another of the same result."""
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.call_function(target, tuple(args), kwargs or {})
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def placeholder_sources(gm: fx.GraphModule) -> dict[str, Any]:
    """Where Dynamo says each placeholder of ``gm`` came from, by name."""
    return {n.name: getattr(n, "_dynamo_source", None) for n in gm.graph.nodes if n.op == "placeholder"}


def like_dynamo_graph(new: fx.GraphModule, old: fx.GraphModule, sources: dict[str, Any] | None = None
                      ) -> fx.GraphModule:
    """Give a GraphModule made from Dynamo's graph ``old`` (a copy, a split) the metadata Inductor reads off
    Dynamo graphs: the compile id, and where each parameter and placeholder came from — so static inputs
    (parameters, buffers, tensors marked with ``mark_static_address`` such as a static KV cache) keep their
    static addresses under CUDA graphs, and their in-place updates do not turn CUDA graphs off. Placeholders
    that are not Dynamo's (values attnfx adds as inputs) get no source: they are copied in on each replay."""
    for key, value in old.meta.items():
        new.meta.setdefault(key, value)
    if hasattr(old, "_param_name_to_source"):
        new._param_name_to_source = old._param_name_to_source
    sources = placeholder_sources(old) if sources is None else sources
    for n in new.graph.nodes:
        if n.op == "placeholder":
            n._dynamo_source = sources.get(n.name)
    return new


# ---------------------------------------------------------------------------------------------
# provenance: where a node comes from in the user's code


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_INDEX = re.compile(r"\[(\d+)\]")
_KEY = re.compile(r"\[['\"]([^'\"]+)['\"]\]")


def source_of(node: fx.Node) -> str:
    """``file:line`` of the innermost frame that made this node (the attention call itself)."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return "<unknown>"
    path, line, _ = frames[-1]
    return f"{_short_path(path)}:{line}"


def _short_path(path: str) -> str:
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


def module_of(node: fx.Node, names: dict[int, str] | None = None) -> str:
    """Qualified path of the innermost nn.Module the node was traced in (``model.layers.0.self_attn``).

    ``names`` maps ``id(module)`` to its name in the model being optimized (``named_modules()``): the module
    object is found from the frame Dynamo compiled, so the name is right whatever the frame (a graph break
    inside a layer, a wrapper taking the model as ``*args``). Without it, paths from the frame's own first
    argument (``self``, however it is spelled) are relative to it; paths from other variables start with the
    variable's name."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return _frame_self_name(names)
    path = list(stack.values())[-1][0]
    m = _ROOT.match(path)
    if m is None:
        return clean_module_path(path)
    root, rel = m.group(0).rstrip("."), clean_module_path(path[m.end():])
    obj = _frame_value(root)
    if names is not None and isinstance(obj, torch.nn.Module):
        try:
            sub = obj.get_submodule("" if rel == "<root>" else rel)
        except AttributeError:
            sub = None
        if id(sub) in names:
            return names[id(sub)] or "<root>"
    if root == _frame_self():
        return rel
    return clean_module_path(path)


# the object a Dynamo source starts from: a local or global, with the subscripts that pick it out of
# *args/**kwargs (L['self'], L['s'], L['args'][0], G['net'])
_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\](\[[^\]]+\])*\.?")


def _tx() -> Any:
    """The frame Dynamo is compiling (backends run inside its tracing), or None."""
    try:
        return InstructionTranslator.current_tx()
    except Exception:  # pragma: no cover - outside Dynamo: frame-relative names
        return None


def _frame_self() -> str:
    """The source of the module whose code the compiled frame runs: its first argument (``L['self']``,
    ``L['s']``), a local named ``self`` (a frame resumed after a graph break), or ``L['args'][0]``."""
    tx = _tx()
    code = getattr(tx, "f_code", None)
    if code is None:
        return "L['self']"
    candidates = []
    if code.co_argcount:
        candidates.append(f"L['{code.co_varnames[0]}']")
    candidates.append("L['self']")
    if code.co_flags & 0x04:  # CO_VARARGS
        candidates.append(f"L['{code.co_varnames[code.co_argcount + code.co_kwonlyargcount]}'][0]")
    for source in candidates:
        if isinstance(_frame_value(source), torch.nn.Module):
            return source
    return ""


def _frame_value(source: str) -> Any:
    """The real object a root source (``L['x']``, ``L['args'][0]``, ``G['net']``) stands for in the frame being
    compiled, or None."""
    tx = _tx()
    if tx is None:
        return None
    m = re.match(r"^([LG])\[['\"]([^'\"]+)['\"]\](.*)$", source)
    if m is None:
        return None
    scope = getattr(tx, "f_locals" if m.group(1) == "L" else "f_globals", {})
    value = scope.get(m.group(2))
    for key in re.findall(r"\[([^\]]+)\]", m.group(3)):
        try:
            value = value[int(key)] if key.lstrip("-").isdigit() else value[key.strip("'\"")]
        except Exception:
            return None
    return value


def _frame_self_name(names: dict[int, str] | None) -> str:
    """The name of the module whose own code made a node (no submodule on the stack): the frame's self."""
    if names is not None:
        obj = _frame_value(_frame_self())
        if isinstance(obj, torch.nn.Module) and names.get(id(obj)):
            return names[id(obj)]
    return "<root>"


def clean_module_path(path: str) -> str:
    path = _KEY.sub(r".\1", path)
    path = re.sub(r"^[LG]\.", "", path)
    path = re.sub(r"(^|\.)(__dict__\.)?_modules(?=\.|$)", "", path)  # L['self'].__dict__['_modules'][...]
    path = _INDEX.sub(r".\1", path)
    path = path.replace("..", ".").strip(".")
    return path or "<root>"
