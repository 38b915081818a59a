"""What a node's value depends on, and evaluating it now when it depends on nothing that changes.

Dynamo graphs write in place (``m[a:b, c:d] = True``, ``cache.index_copy_(...)``): a value depends on its
ancestors *and* on in-place writes into any of them (directly or through views) that run before it is
used. Used by the patterns that read masks and index sets at compile time.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

from attnfx.fx.graph import aliases_input, call_name, fake, writes_in_place

RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "normal",
          "multinomial", "dropout", "uniform_", "normal_", "randperm"}

def replays_differently(n: fx.Node) -> bool:
    """Random, in-place or opaque: a node whose value cannot be recomputed apart from the graph run."""
    if n.op == "call_module":
        return True
    return n.op in ("call_function", "call_method") and (call_name(n) in RANDOM or writes_in_place(n))


def closure(mask: fx.Node, consumer: fx.Node) -> set[fx.Node]:
    """Every node the mask's value depends on: its ancestors, and the in-place writes into any of them
    (directly or through views) that run before ``consumer`` — with their own ancestors."""
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    needed: set[fx.Node] = set()

    def add(n: fx.Node) -> None:
        stack = [n]
        while stack:
            x = stack.pop()
            if x not in needed:
                needed.add(x)
                stack.extend(x.all_input_nodes)

    add(mask)
    changed = True
    while changed:
        changed = False
        for n in list(needed):
            aliases, frontier = {n}, [n]
            while frontier:  # views of n share its memory
                for u in frontier.pop().users:
                    if aliases_input(u) and u not in aliases:
                        aliases.add(u)
                        frontier.append(u)
            for a in aliases:
                for u in a.users:
                    if u not in needed and writes_in_place(u) and order[u] < order[consumer] and u.args and u.args[0] is a:
                        add(u)
                        changed = True
    return needed


def dependencies(mask: fx.Node, consumer: fx.Node) -> tuple[list[fx.Node], list[fx.Node], str | None]:
    """The graph inputs a mask is computed from: (tensors, symbolic ints, why not usable)."""
    tensors, ints = [], []
    needed = closure(mask, consumer)
    for n in (n for n in mask.graph.nodes if n in needed):  # in graph order
        val = fake(n)
        if n.op in ("placeholder", "get_attr"):
            if isinstance(val, torch.SymInt):
                ints.append(n)
            elif isinstance(val, torch.Tensor) or n.op == "get_attr":
                tensors.append(n)
            continue
        if call_name(n) in RANDOM:
            return [], [], f"the mask is computed with a random op ({call_name(n)})"
    return tensors, ints, None


def evaluate(mask: fx.Node, consumer: fx.Node) -> torch.Tensor:
    """Run the nodes a mask that reads no graph input is made of (in-place writes included), now."""
    prefix, _ = extract(mask, consumer)
    return _run(prefix, [])


def constant_value(n: Any, consumer: fx.Node) -> Any:
    """``n``'s value as ``consumer`` sees it when it reads no graph input (evaluated now), else None."""
    if not isinstance(n, fx.Node):
        return n
    tensors, ints, problem = dependencies(n, consumer)
    if tensors or ints or problem:
        return None
    return evaluate(n, consumer)


def extract(mask: fx.Node, consumer: fx.Node, needed: set[fx.Node] | None = None
            ) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A small graph computing ``mask`` as ``consumer`` sees it, and the graph inputs it takes (in order)."""
    gm = mask.graph.owning_module
    needed = closure(mask, consumer) if needed is None else needed
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = []
    for n in mask.graph.nodes:
        if n in needed:
            env[n] = sub.node_copy(n, lambda x: env[x])
            if n.op == "placeholder":
                placeholders.append(n)
    sub.output(env[mask])
    return fx.GraphModule(gm, sub), placeholders


def _run(prefix: fx.GraphModule, values: list) -> Any:
    """Run a prefix graph on real values, outside the fake mode Dynamo compiles under."""
    unset = getattr(torch._subclasses.fake_tensor, "unset_fake_temporarily", None)
    with (unset() if unset is not None else torch.no_grad()), torch.no_grad():
        return prefix(*values)


def runtime_value(node: fx.Node, consumer: fx.Node, example_inputs) -> tuple[torch.Tensor, fx.GraphModule, list[int]] | None:
    """A value computed from graph tensor inputs alone, with no in-place write or random op on the way:
    its value for the example inputs, the graph computing it, and the input positions that graph takes.
    None when it is not such a value or the example inputs are not real tensors."""
    if example_inputs is None:
        return None
    placeholders = [n for n in node.graph.nodes if n.op == "placeholder"]
    needed = closure(node, consumer)
    if any(replays_differently(n) for n in needed):
        return None
    prefix, used = extract(node, consumer, needed)
    positions = [placeholders.index(p) for p in used]
    values = [example_inputs[i] for i in positions]
    if not all(isinstance(v, torch.Tensor) and not isinstance(v, torch._subclasses.FakeTensor) for v in values):
        return None
    value = _run(prefix, values)
    return (value, prefix, positions) if isinstance(value, torch.Tensor) else None


def input_names(prefix: fx.GraphModule) -> str:
    """The user-facing names of the graph inputs a prefix graph reads (``L_image_mask_`` -> ``image_mask``)."""
    names = [re.sub(r"^[LG]_(.+)_$", r"\1", str(n.target)) for n in prefix.graph.nodes if n.op == "placeholder"]
    return "the graph input" + ("s " if len(names) > 1 else " ") + ", ".join(names)


HEAVY = {"matmul", "linear", "baddbmm", "einsum", "conv1d", "conv2d", "conv3d", "sdpa", "softmax"}
MAX_CHECK_OPS = 64


def cheap(prefix: fx.GraphModule) -> bool:
    """A value re-checked once per distinct input must be cheap to recompute: elementwise ops, no matmuls."""
    ops = [n for n in prefix.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    return len(ops) <= MAX_CHECK_OPS and not any(call_name(n) in HEAVY or n.op == "call_module" for n in ops)
