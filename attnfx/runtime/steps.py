"""Denoising steps: which forward call of a request this is (the selectors "0-2,4" are parsed in ``attnfx.options``).

The step index counts forward calls since the last :func:`reset_steps` (a new request): the first
attention layer of the model (layer index 0) advances it each time it runs. ``with denoise_step(i):``
sets it explicitly instead. :func:`native_reason` is the one step/layer selector of the FP8 targets.
"""

from __future__ import annotations

import contextlib
import threading


class _Steps(threading.local):
    def __init__(self):
        self.count = -1  # advanced to 0 by the first layer of the first call
        self.explicit: int | None = None


_state = _Steps()


def reset_steps() -> None:
    """Start a new request: the next forward call is step 0."""
    _state.count = -1
    _state.explicit = None


@contextlib.contextmanager
def denoise_step(index: int):
    """Run the enclosed forward call(s) as denoising step ``index``."""
    previous = _state.explicit
    _state.explicit = int(index)
    try:
        yield
    finally:
        _state.explicit = previous


def current_step(layer: int) -> int:
    """The step a site of ``layer`` runs in; layer 0 advances the automatic count."""
    if _state.explicit is not None:
        return _state.explicit
    if layer == 0:
        _state.count += 1
    return max(_state.count, 0)


def native_reason(layer: int, step: int, skip_steps: frozenset[int], skip_layers: frozenset[int]) -> str | None:
    """Why a quantized site runs in native precision at this call ("layer skipped" / "step skipped"), or None:
    the one selector of ``skip_layers`` / ``skip_steps`` for every FP8 target."""
    if layer in skip_layers:
        return "layer skipped"
    if step in skip_steps:
        return "step skipped"
    return None


@contextlib.contextmanager
def rerun():
    """Run a forward call again as the same step (verification re-runs a graph): the count is restored after."""
    saved = (_state.count, _state.explicit)
    try:
        yield
    finally:
        _state.count, _state.explicit = saved
