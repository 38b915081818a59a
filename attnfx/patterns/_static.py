"""What a node's value depends on, and evaluating it now when it depends on nothing that changes.

Dynamo graphs write in place (``m[a:b, c:d] = True``, ``cache.index_copy_(...)``): a value depends on its
ancestors *and* on in-place writes into any of them (directly or through views) that run before it is
used. Used by the patterns that read masks and index sets at compile time.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attnfx.rewriter.graph import aliases_input, call_name, fake

RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "normal",
          "multinomial", "dropout", "uniform_", "normal_", "randperm"}

def _mutates(n: fx.Node) -> bool:
    return n.target is operator.setitem or call_name(n).endswith("_") or "out" in n.kwargs


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
                    if u not in needed and _mutates(u) and order[u] < order[consumer] and u.args and u.args[0] is a:
                        add(u)
                        changed = True
    return needed


def dependencies(mask: fx.Node, consumer: fx.Node) -> tuple[list[fx.Node], list[fx.Node], str | None]:
    """The graph inputs a mask is computed from: (tensors, symbolic ints, why not usable)."""
    tensors, ints = [], []
    needed = closure(mask, consumer)
    for n in sorted(needed, key=lambda n: list(mask.graph.nodes).index(n)):
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
    """Run the nodes a constant mask is made of (in-place writes included), now."""
    gm = mask.graph.owning_module
    needed = closure(mask, consumer)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in mask.graph.nodes:
        if n in needed:
            env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[mask])
    unset = getattr(torch._subclasses.fake_tensor, "unset_fake_temporarily", None)
    with (unset() if unset is not None else torch.no_grad()), torch.no_grad():
        return fx.GraphModule(gm, sub)()


