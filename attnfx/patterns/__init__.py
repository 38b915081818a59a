"""Patterns: one module per rewrite. Each reads as a short proof: what it matches, why the rewrite is exact,
when it refuses.

The registry below lists them; :func:`attnfx.patterns.base.order` runs them in an order that satisfies
each one's ``after``/``before`` (checked here, at import). A later pattern sees what an earlier one built:
the SDPA call ``manual_attention`` creates is what ``gqa`` rewrites; ``dead_tokens`` then drops query rows
nobody reads and key columns nobody may attend; with an NPU target ``npu_attention`` moves SDPA calls to
Ascend's fused attention; ``mask_structure`` last replaces a masked SDPA by the kernels its mask's structure
allows.

Adding a pattern
----------------
1. Write ``attnfx/patterns/<name>.py``: a docstring with three parts — *What it matches*, *Why the rewrite
   is exact*, *When it refuses* — then ``rewrite(site, ctx)`` and, last,
   ``PATTERN = Pattern("<name>", rewrite, applies_to="sdpa", after=(...), before=(...))``.
   ``rewrite`` returns ``None`` where the pattern does not apply, raises ``Refused(reason, **details)``
   where it applies but must not rewrite, and returns an ``Outcome`` when it rewrote the site. It reads
   options from ``ctx.options`` (declare new ones as fields of ``attnfx.options.Options``), builds nodes
   with ``attnfx.fx.graph.emit`` (typed, with provenance) and swaps a call with ``replace_call``; a kernel
   it calls at run time is a ``torch.library`` custom op in ``attnfx/runtime/ops.py``.
2. Add the module to the registration line below.
3. Test it against a model you did not write (HF transformers / diffusers), optimized vs original, and
   where it must refuse (``tests/``); the report then lists it per site.
"""

from __future__ import annotations

from attnfx.patterns import dead_tokens, fp8_attention, gqa, manual_attention, mask_structure, npu_attention
from attnfx.patterns.base import Pattern, order

ORDER: tuple[Pattern, ...] = order([m.PATTERN for m in (
    manual_attention, gqa, dead_tokens, npu_attention, fp8_attention, mask_structure,
)])
REGISTRY: dict[str, Pattern] = {p.name: p for p in ORDER}
NAMES: tuple[str, ...] = tuple(REGISTRY)
