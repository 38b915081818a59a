"""Denoising steps and layer selectors: which forward call of a request this is, and "0-2,4" strings.

The step index counts forward calls since the last :func:`reset_steps` (a new request): the first
attention layer of the model (layer index 0) advances it each time it runs. ``with denoise_step(i):``
sets it explicitly instead.
"""

from __future__ import annotations

import contextlib
import threading


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
