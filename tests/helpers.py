"""Test helpers: compile through attnfx with the eager inner compiler and keep the rewritten graphs."""

from __future__ import annotations

import collections

import torch
import torch.fx as fx

import attnfx
from attnfx.rewriter.optimize import compile_with
from attnfx.fx.graph import op_name


class Compiled:
    def __init__(self, fn, dynamic=None, **options):
        self.graphs: list[fx.GraphModule] = []

        def keep(gm, example_inputs):
            self.graphs.append(gm)
            return gm.forward

        options.setdefault("compiler", keep)
        options.setdefault("strict", True)
        self.backend = attnfx.Backend(**options)
        self.fn = compile_with(self.backend, fn, dynamic=dynamic)  # as attnfx.optimize compiles

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    @property
    def report(self) -> attnfx.Report:
        return self.backend.report

    @property
    def sites(self):
        return self.report.sites

    def ops(self) -> list[str]:
        return [op_name(n) or str(n.target) for g in self.graphs for n in g.graph.nodes if n.op.startswith("call")]

    def sdpa_nodes(self):
        return [n for g in self.graphs for n in g.graph.nodes if op_name(n) == "sdpa"]


def repeat_kv(x, n):
    """HF transformers' repeat_kv: (b, hkv, s, d) -> (b, hkv * n, s, d), head h reading K/V head h // n."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def assert_same(actual, expected, dtype=None):
    dtype = dtype or expected.dtype
    tol = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-7, 1e-7), torch.bfloat16: (2e-2, 2e-2),
           torch.float16: (2e-3, 2e-3)}[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol[0], atol=tol[1], equal_nan=True)


class HostSyncs:
    """Counts, while active, the calls that read tensor values on the host — each a device synchronisation on
    a GPU, and what a CUDA graph capture cannot hold: ``.item()``, ``.tolist()``, ``bool(t)``, ``torch.equal``,
    ``nonzero``, ``masked_select``... Python-level calls only: what attnfx's own code and an eager-compiled
    graph do (Inductor's compiled kernels are not seen, and do the same with or without attnfx)."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
    FUNCTIONS = ("equal", "nonzero", "masked_select", "unique", "allclose", "argwhere")

    def __enter__(self) -> "HostSyncs":
        self.calls: collections.Counter = collections.Counter()
        self._saved = []
        for owner, names in ((torch.Tensor, self.METHODS), (torch, self.FUNCTIONS)):
            for name in names:
                original = getattr(owner, name)

                def counted(*args, _original=original, _name=name, **kwargs):
                    self.calls[_name] += 1
                    return _original(*args, **kwargs)

                setattr(owner, name, counted)
                self._saved.append((owner, name, original))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in self._saved:
            setattr(owner, name, original)
