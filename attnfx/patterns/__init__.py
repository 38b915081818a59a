"""Patterns: one module per rewrite. Each says what it matches, why the rewrite is exact, when it refuses.

A pattern module exposes ``NAME`` and ``rewrite(site, ctx) -> Outcome | None``. The pass manager
runs them in the order of :data:`ORDER`; a later pattern sees what an earlier one built (the SDPA
call that ``manual_attention`` creates is what ``gqa`` then rewrites; ``dead_tokens`` then drops query rows
nobody reads and key columns nobody may attend; with an NPU target ``npu_attention`` moves SDPA calls to
Ascend's fused attention; ``mask_structure`` last replaces a masked SDPA by the kernels its mask's
structure allows).
"""

from __future__ import annotations

from types import ModuleType

from attnfx.patterns import dead_tokens, gqa, manual_attention, mask_structure, npu_attention

ORDER: tuple[ModuleType, ...] = (manual_attention, gqa, dead_tokens, npu_attention, mask_structure)
REGISTRY: dict[str, ModuleType] = {m.NAME: m for m in ORDER}
NAMES: tuple[str, ...] = tuple(REGISTRY)
