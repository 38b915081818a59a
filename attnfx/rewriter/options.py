"""The options of ``attnfx.optimize`` and of the ``attnfx`` torch.compile backend, validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

import torch

COMPILERS = ("inductor", "eager", "aot_eager")

# default verification tolerances per dtype (rtol, atol): kernels round differently, nothing more
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}


class OptionsError(ValueError):
    """An option name or value attnfx does not accept."""


@dataclass(frozen=True)
class Options:
    compiler: str | Callable = "inductor"
    patterns: tuple[str, ...] = ()
    verify: bool = False
    rtol: float | None = None
    atol: float | None = None
    inductor_config: Mapping[str, Any] = field(default_factory=dict)
    kernel: str | None = None  # force the kernel of structured (mask_structure) sites, e.g. "varlen.reference"
    autotune: bool = False  # time the exact kernels for each distinct mask once, keep the fastest
    cache_invariants: bool = True  # compute once what every call recomputes from unchanged inputs
    specialize: bool = True  # specialize on masks / index sets passed in, checked once per distinct tensor
    npu: bool = False  # run SDPA sites on Ascend's fused infer attention (needs torch_npu)
    npu_fp8: bool = False  # ... with online FP8 (implies npu)
    skip_steps: str = ""  # "0-2,4": denoising steps that stay in native precision
    skip_layers: str = ""  # "0,31": attention layers (site index in the model) that stay in native precision

    @property
    def skip_steps_set(self) -> frozenset[int]:
        from attnfx.runtime.steps import parse_selector

        return parse_selector(self.skip_steps, "skip_steps")

    @property
    def skip_layers_set(self) -> frozenset[int]:
        from attnfx.runtime.steps import parse_selector

        return parse_selector(self.skip_layers, "skip_layers")
    # raise attnfx's own internal errors instead of compiling the graph unchanged (default: $ATTNFX_STRICT=1)
    strict: bool = field(default_factory=lambda: os.environ.get("ATTNFX_STRICT", "") == "1")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None = None, **more: Any) -> "Options":
        from attnfx.patterns import NAMES

        merged = dict(options or {})
        merged.update(more)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise OptionsError(f"unknown attnfx option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        compiler = merged.get("compiler", "inductor")
        if not callable(compiler) and compiler not in COMPILERS:
            raise OptionsError(f"compiler must be one of {', '.join(COMPILERS)} or a callable(gm, example_inputs), "
                               f"not {compiler!r}")
        merged["patterns"] = _patterns(merged.get("patterns"), NAMES)
        for name in ("rtol", "atol"):
            v = merged.get(name)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise OptionsError(f"{name} must be a non-negative number, not {v!r}")
        for name in ("skip_steps", "skip_layers"):
            from attnfx.runtime.steps import parse_selector

            try:
                parse_selector(merged.get(name, ""), name)
            except ValueError as e:
                raise OptionsError(str(e)) from None
            merged[name] = merged.get(name) or ""
        for name in ("verify", "strict", "cache_invariants", "specialize", "npu", "npu_fp8", "autotune"):
            if not isinstance(merged.get(name, False), bool):
                raise OptionsError(f"{name} must be True or False, not {merged[name]!r}")
        kernel = merged.get("kernel")
        if kernel is not None:
            from attnfx.backends.capabilities import BY_NAME

            structured = [n for n, k in BY_NAME.items() if k.family in ("execute", "varlen", "reference", "flex")]
            if kernel not in structured:
                raise OptionsError(f"kernel must be one of {', '.join(structured)}, not {kernel!r}")
        cfg = merged.get("inductor_config", {}) or {}
        if not isinstance(cfg, Mapping):
            raise OptionsError("inductor_config must be a dict of torch._inductor.config settings")
        merged["inductor_config"] = dict(cfg)
        if merged.get("npu") or merged.get("npu_fp8"):
            from attnfx.backends.npu import NpuUnavailable, load

            try:
                load()
            except NpuUnavailable as e:
                raise OptionsError(f"an NPU target was requested but {e}") from None
        return cls(**merged)

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        rtol, atol = DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))
        return (self.rtol if self.rtol is not None else rtol, self.atol if self.atol is not None else atol)


def _patterns(value: Any, names: tuple[str, ...]) -> tuple[str, ...]:
    """None/"all" -> every pattern; a list of names; or a dict {name: bool} switching from all."""
    if value is None or value == "all":
        return names
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        chosen = [n for n in names if value.get(n, True)]
        keys = list(value)
    else:
        try:
            keys = list(value)
        except TypeError:
            raise OptionsError(f"patterns must be a list of names or a dict of name: bool, not {value!r}") from None
        chosen = [n for n in names if n in keys]
    bad = [k for k in keys if k not in names]
    if bad:
        raise OptionsError(f"unknown pattern(s) {', '.join(map(repr, bad))}; available: {', '.join(names)}")
    return tuple(chosen)
