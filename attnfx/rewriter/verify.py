"""``verify=True``: on the first call of each compiled graph, run the graph as captured and as
rewritten side by side, compare every rewritten site's output and the graph's outputs, and raise
:class:`VerificationError` naming the first site that differs beyond the dtype's tolerance.

FP8 sites (``fp8=True``) are bounded, not exact: in the verification run they run quantized whatever the step
(each measures its own error against the native kernel and stays native above ``fp8_max_error``), their
relative L2 against the original is recorded in the report (``fp8.verify_rel_l2``), and the graph's outputs
are compared by relative L2 against ``fp8_max_error`` instead of the dtype's tolerance."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from attnfx.fx.graph import mutated_inputs
from attnfx.fx.sites import Site
from attnfx.options import Options
from attnfx.rewriter.report import Report
from attnfx.runtime import ops

log = logging.getLogger("attnfx")

class VerificationError(AssertionError):
    """The rewritten graph's result differs from the original's beyond rounding."""


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def _difference(expected: Any, actual: Any, options: Options) -> str | None:
    if not isinstance(expected, torch.Tensor):
        return None
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return f"shape {tuple(getattr(actual, 'shape', ()))} instead of {tuple(expected.shape)}"
    if not expected.dtype.is_floating_point:
        return None if torch.equal(actual, expected) else "integer/bool values differ"
    rtol, atol = options.tolerance(expected.dtype)
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        return " ".join(lines[:4])
    return None


class Verifier:
    """The compiled callable, wrapped so that its first call is checked against the original graph."""

    def __init__(self, original: fx.GraphModule, rewritten: fx.GraphModule, compiled: Callable,
                 sites: Sequence[Site], options: Options, report: Report):
        self.original, self.rewritten, self.compiled = original, rewritten, compiled
        self.sites = [s for s in sites if s.record.rewritten]
        self.options, self.report = options, report
        self.pending = True

    def __call__(self, *args: Any) -> Any:
        if self.pending:
            self.check(args)
            self.pending = False
        return self.compiled(*args)

    def check(self, args: Sequence[Any]) -> None:
        mutated = mutated_inputs(self.original.graph)

        def fresh() -> list:
            return [a.clone() if i in mutated and isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]

        devices = sorted({a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda})
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            cpu_state = torch.random.get_rng_state()
            cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
            orig = _Capture(self.original, {s.original_output for s in self.sites})
            expected_outputs = orig.run(*fresh())
            torch.random.set_rng_state(cpu_state)
            for d, st in zip(devices, cuda_states):
                torch.cuda.set_rng_state(st, d)
            new = _Capture(self.rewritten, {s.output.name for s in self.sites})
            with ops.verifying():
                actual_outputs = new.run(*fresh())
        quantized = [s for s in self.sites if _ran_fp8(s)]
        for site in self.sites:
            if site.output.name not in new.values:
                continue  # the site's result is no value of its own any more (fused downstream): outputs decide
            expected, actual = orig.values.get(site.original_output), new.values.get(site.output.name)
            live = site.record.details.get("live_rows")
            if live is not None and isinstance(expected, torch.Tensor):  # only the live rows are computed
                expected = expected[..., live[0]:live[1], :]
                if isinstance(actual, torch.Tensor) and actual.shape[-2] != expected.shape[-2]:
                    actual = actual[..., live[0]:live[1], :]
            if site in quantized and _relative(expected, actual) is not None:
                site.record.details["fp8"]["verify_rel_l2"] = _relative(expected, actual)
                continue
            diff = _difference(expected, actual, self.options)
            if diff is not None:
                rec = site.record
                raise VerificationError(
                    f"attnfx verify: attention site {rec.module} ({rec.source}) rewritten by "
                    f"{'+'.join(rec.patterns)} into {rec.target} differs from the original: {diff}")
        flat_e, flat_a = _flatten(expected_outputs), _flatten(actual_outputs)
        if len(flat_e) != len(flat_a):
            raise VerificationError(f"attnfx verify: the graph returns {len(flat_a)} values instead of {len(flat_e)}")
        for i, (e, a) in enumerate(zip(flat_e, flat_a)):
            if quantized and _relative(e, a) is not None:
                err, bound = _relative(e, a), self.options.fp8_max_error
                if not err <= bound:
                    raise VerificationError(
                        f"attnfx verify: graph output {i} differs from the original by relative L2 {err:.3g} > "
                        f"fp8_max_error {bound:g} with FP8 attention at {len(quantized)} site(s); keep more layers "
                        f"native (skip_layers) or allow more error")
                continue
            diff = _difference(e, a, self.options)
            if diff is not None:
                raise VerificationError(f"attnfx verify: graph output {i} differs from the original: {diff}")
        if self.report.verified is not False:
            self.report.verified = True
        log.info("attnfx: verified %d rewritten site(s) against the original graph", len(self.sites))


def _ran_fp8(site: Site) -> bool:
    """Whether the site ran quantized in the verification run (an FP8 site: bounded, not exact)."""
    d = site.record.details.get("fp8")
    return isinstance(d, dict) and (d.get("last") or {}).get("precision") == "fp8"


def _relative(expected: Any, actual: Any) -> float | None:
    """‖actual − expected‖ / ‖expected‖ of two float tensors of one shape (None otherwise)."""
    if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)) or actual.shape != expected.shape:
        return None
    if not expected.dtype.is_floating_point:
        return None
    e = expected.float()
    return float(torch.linalg.vector_norm(actual.float() - e) / torch.linalg.vector_norm(e).clamp_min(1e-30))


def _flatten(x: Any) -> list:
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flatten(v)]
    return [x]
