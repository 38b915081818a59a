"""Test helpers: compile through attnfx with the eager inner compiler and keep the rewritten graphs."""

from __future__ import annotations

import torch
import torch.fx as fx

import attnfx
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
        self.fn = torch.compile(fn, backend=self.backend, dynamic=dynamic)

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
