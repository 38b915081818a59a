"""The options of ``attnfx.optimize`` and of the ``attnfx`` torch.compile backend, validated once.

Each option is a field of :class:`Options`; its check is derived from the field's type (``bool`` fields take
True/False, ``float | None`` fields a non-negative number) or, for the few that need more, named in
``_CHECKS``. Anything wrong raises :class:`OptionsError` when the options are made — at ``optimize()`` or
``Backend()`` time, never at the first call.
"""

from __future__ import annotations

import functools
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import torch
import torch._inductor.config as inductor_config

from attnfx.backends import capabilities
from attnfx.backends.cudnn_fp8 import CudnnUnavailable, load as load_cudnn
from attnfx.backends.npu import NpuUnavailable, load as load_npu

COMPILERS = ("inductor", "eager", "aot_eager")
# torch.compile's modes; "reduce-overhead" runs the graph under CUDA graphs (Inductor's cudagraph trees)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# default verification tolerances per dtype (rtol, atol): kernels round differently, nothing more
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}


class OptionsError(ValueError):
    """An option name or value attnfx does not accept."""


def parse_selector(text: str | None, what: str = "selector") -> frozenset[int]:
    """``"0-2,4"`` -> {0, 1, 2, 4}: comma-separated non-negative ints and inclusive ranges."""
    if text is None or (isinstance(text, str) and text.strip() == ""):
        return frozenset()
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string like '0-2,4', not {text!r}")
    out: set[int] = set()
    for part in text.split(","):
        item = part.strip()
        try:
            if "-" in item:
                lo_s, hi_s = item.split("-", 1)
                lo, hi = int(lo_s), int(hi_s)
                if lo < 0 or hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                value = int(item)
                if value < 0:
                    raise ValueError
                out.add(value)
        except ValueError:
            raise ValueError(f"{what} {text!r}: {part!r} is not a non-negative integer or an inclusive range "
                             f"'a-b' with a <= b") from None
    return frozenset(out)


@dataclass(frozen=True)
class Options:
    compiler: str | Callable = "inductor"  # inner compiler after the rewrite
    mode: str | None = None  # torch.compile's mode for the inner (Inductor) compile
    patterns: tuple[str, ...] = ()  # the patterns that run, in the registry's order
    verify: bool = False  # check the first call of each graph against the graph as captured
    rtol: float | None = None
    atol: float | None = None
    inductor_config: Mapping[str, Any] = field(default_factory=dict)
    kernel: str | None = None  # force the kernel of structured (mask_structure) sites, e.g. "varlen.reference"
    autotune: bool = False  # time the exact kernels for each distinct mask once, keep the fastest
    # compute once what every call recomputes from unchanged inputs; True: values reading nn.Parameters are
    # computed every call (weights edited through .data cannot be seen); "all": those too (see clear_caches)
    cache_invariants: bool | str = True
    specialize: bool = True  # specialize on masks / index sets passed in, checked once per distinct tensor
    npu: bool = False  # run SDPA sites on Ascend's fused infer attention (needs torch_npu)
    npu_fp8: bool = False  # ... with online FP8 (implies npu)
    fp8: bool = False  # run SDPA sites on CUDA with online FP8 attention (cuDNN frontend sdpa_fp8)
    fp8_max_error: float = 0.05  # relative L2 vs the native kernel above which an FP8 site stays native
    skip_steps: str = ""  # "0-2,4": denoising steps that stay in native precision
    skip_layers: str = ""  # "0,31": attention layers (site index in the model) that stay in native precision
    progress: bool = True  # log a line per graph whose rewrite and compile take long
    # raise attnfx's own internal errors instead of compiling the graph unchanged (default: $ATTNFX_STRICT=1)
    strict: bool = field(default_factory=lambda: os.environ.get("ATTNFX_STRICT", "") == "1")

    @property
    def skip_steps_set(self) -> frozenset[int]:
        return parse_selector(self.skip_steps, "skip_steps")

    @property
    def skip_layers_set(self) -> frozenset[int]:
        return parse_selector(self.skip_layers, "skip_layers")

    @property
    def cuda_graphs(self) -> bool:
        """Whether Inductor runs the compiled graphs as CUDA graphs (what a replay repeats is fixed at capture)."""
        return self.mode in ("reduce-overhead", "max-autotune") or bool(self.inductor_config.get("triton.cudagraphs"))

    @property
    def quantized(self) -> bool:
        """Whether some target quantizes attention (the step/layer selectors apply to it)."""
        return self.npu_fp8 or self.fp8

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None = None, *, pattern_names: Sequence[str],
                     **more: Any) -> "Options":
        """Options from a mapping of names (plus keywords), checked; ``pattern_names`` are the registered
        patterns, in order (default: all of them)."""
        merged = {**(options or {}), **more}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise OptionsError(f"unknown attnfx option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        merged["patterns"] = _patterns(merged.get("patterns"), tuple(pattern_names))
        hints = _hints()
        for name, value in list(merged.items()):
            check = _CHECKS.get(name) or _TYPE_CHECKS.get(hints[name])
            if check is not None:
                merged[name] = check(name, value)
        if (merged.get("skip_steps") or merged.get("skip_layers")) and not (merged.get("npu_fp8") or merged.get("fp8")):
            raise OptionsError("skip_steps / skip_layers select what stays in native precision under FP8 "
                               "attention: they need npu_fp8=True or fp8=True")
        if merged.get("fp8") and (merged.get("npu") or merged.get("npu_fp8")):
            raise OptionsError("fp8 (CUDA, cuDNN) and npu / npu_fp8 (Ascend) are different targets: choose one")
        if merged.get("fp8"):
            try:
                load_cudnn()
            except CudnnUnavailable as e:
                raise OptionsError(f"fp8=True needs the cuDNN frontend's FP8 attention but {e}") from None
        if merged.get("npu") or merged.get("npu_fp8"):
            try:
                load_npu()
            except NpuUnavailable as e:
                raise OptionsError(f"an NPU target was requested but {e}") from None
        return cls(**merged)

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        rtol, atol = DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))
        return (self.rtol if self.rtol is not None else rtol, self.atol if self.atol is not None else atol)


@functools.lru_cache(maxsize=None)
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(Options)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionsError(f"{name} must be True or False, not {value!r}")
    return value


def _check_tolerance(name: str, value: Any) -> float | None:
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        raise OptionsError(f"{name} must be a non-negative number, not {value!r}")
    return value


def _check_compiler(name: str, value: Any) -> Any:
    if not callable(value) and value not in COMPILERS:
        raise OptionsError(f"compiler must be one of {', '.join(COMPILERS)} or a callable(gm, example_inputs), "
                           f"not {value!r}")
    return value


def _check_mode(name: str, value: Any) -> str | None:
    if value is not None and value not in MODES:
        raise OptionsError(f"mode must be one of {', '.join(MODES)} or None, not {value!r}")
    return None if value == "default" else value


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise OptionsError(f"{name} must be a positive number (a relative L2 error, e.g. 0.05), not {value!r}")
    return float(value)


def _check_selector(name: str, value: Any) -> str:
    try:
        parse_selector(value, name)
    except ValueError as e:
        raise OptionsError(str(e)) from None
    return value or ""


def _check_cache_invariants(name: str, value: Any) -> bool | str:
    if not isinstance(value, bool) and value != "all":
        raise OptionsError(f"cache_invariants must be True, False or 'all' (also values that read parameters), "
                           f"not {value!r}")
    return value


def _check_kernel(name: str, value: Any) -> str | None:
    structured = capabilities.structured_kernels()
    if value is not None and value not in structured:
        raise OptionsError(f"kernel must be one of {', '.join(structured)}, not {value!r}")
    return value


def _check_inductor_config(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OptionsError("inductor_config must be a dict of torch._inductor.config settings")
    for key in value:
        obj: Any = inductor_config
        for part in str(key).split("."):
            if not hasattr(obj, part):
                raise OptionsError(f"inductor_config: torch._inductor.config has no setting {key!r}")
            obj = getattr(obj, part)
    return dict(value)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "compiler": _check_compiler, "mode": _check_mode, "skip_steps": _check_selector, "skip_layers": _check_selector,
    "kernel": _check_kernel, "inductor_config": _check_inductor_config, "patterns": lambda name, v: v,
    "cache_invariants": _check_cache_invariants,
    "fp8_max_error": _check_fraction,
}
_TYPE_CHECKS: dict[Any, Callable[[str, Any], Any]] = {bool: _check_bool, typing.Optional[float]: _check_tolerance}


def _patterns(value: Any, names: tuple[str, ...]) -> tuple[str, ...]:
    """None/"all" -> every pattern; a list of names; or a dict {name: bool} switching from all."""
    if value is None or value == "all":
        return names
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        bad_values = {k: v for k, v in value.items() if not isinstance(v, bool)}
        if bad_values:
            raise OptionsError(f"patterns: a dict must map pattern names to True/False, not {bad_values!r}")
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
