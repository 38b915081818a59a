"""Mask structure analysis: every structure, static and runtime analysis, every structured kernel, against
the original masked SDPA; rows with no allowed key; the plan cache; gradients; the custom op's contract."""

import gc
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import Compiled, assert_same, repeat_kv

from attnfx.backends import execute, reference
from attnfx.masks import (BlockDiagonal, Causal, General, NoMask, Padding, RowGroups, Segment, allowed_of,
                          classify)
from attnfx.runtime import ops

H, HKV, D = 4, 2, 16

STRUCTURES = {  # name: (structure, batch, q_len, kv_len)
    "none": (NoMask(), 2, 5, 7),
    "causal_top_left": (Causal("top_left"), 2, 6, 6),
    "causal_bottom_right": (Causal("bottom_right"), 2, 4, 9),
    "causal_more_queries": (Causal("top_left"), 2, 9, 4),
    "sliding_window": (Causal("bottom_right", window=3), 1, 6, 8),
    "padding_right": (Padding((7, 5, 3), "right"), 3, 6, 7),
    "padding_left_causal": (Padding((7, 5, 3), "left", "top_left"), 3, 7, 7),
    "padding_right_causal": (Padding((7, 4, 1), "right", "top_left"), 3, 7, 7),
    "block_diagonal": (BlockDiagonal((3, 4, 2), (5, 4, 3)), 1, 9, 12),
    "block_diagonal_causal": (BlockDiagonal((3, 4, 2), (3, 4, 2), causal=True), 1, 9, 9),
    "row_groups_hunyuan_step2": (RowGroups((Segment(0, 1, 0, 8), Segment(1, 13, 0, 20))), 2, 13, 21),
    "row_groups_hunyuan_step1": (RowGroups((Segment(0, 8, 0, 8, True), Segment(8, 20, 0, 20),
                                            Segment(20, 21, 0, 21))), 2, 21, 21),
}


def qkv(batch, q_len, kv_len, dtype=torch.float32, kv_heads=HKV, requires_grad=False):
    q = torch.randn(batch, H, q_len, D, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(batch, kv_heads, kv_len, D, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(batch, kv_heads, kv_len, D, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def spell(allowed, spelling, dtype):
    if spelling == "bool":
        return allowed
    value = float("-inf") if spelling == "-inf" else torch.finfo(dtype).min
    return torch.where(allowed, 0.0, value).to(dtype)


# ------------------------------------------------------------------------------------------ the classes


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_classify_recovers_the_structure(name):
    structure, batch, q_len, kv_len = STRUCTURES[name]
    dense = structure.materialize(q_len, kv_len)
    analysis = classify(dense, batch, H, q_len, kv_len)
    assert analysis.structure.kind == structure.kind
    assert torch.equal(analysis.structure.materialize(q_len, kv_len).expand_as(dense), dense)


def test_random_masks_always_reproduce():
    rng = random.Random(0)
    for _ in range(400):
        b, q_len, kv_len = rng.randint(1, 3), rng.randint(1, 10), rng.randint(1, 10)
        dense = torch.rand(b, 1, q_len, kv_len) > rng.random()
        analysis = classify(dense, b, H, q_len, kv_len)
        assert torch.equal(analysis.structure.materialize(q_len, kv_len).expand(b, 1, q_len, kv_len), dense)


def test_spellings_and_biases():
    allowed = Causal().materialize(5, 5)
    assert allowed_of(spell(allowed, "-inf", torch.float32))[1] == "-inf"
    assert allowed_of(spell(allowed, "finfo.min", torch.bfloat16))[1] == "finfo.min"
    assert allowed_of(torch.randn(1, 1, 5, 5)) is None  # an additive bias is not a mask
    assert classify(torch.randn(1, 1, 5, 5), 1, H, 5, 5) is None


def test_per_head_masks_that_differ_are_general():
    dense = torch.stack([Causal().materialize(5, 5)[0, 0], NoMask().materialize(5, 5)[0, 0]])[None]
    assert isinstance(classify(dense, 1, 2, 5, 5).structure, General)


# ------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("kernel", ["sdpa.split", "varlen.reference", "reference"])
@pytest.mark.parametrize("fill", ["zero", "nan", "mean_v", "unmasked"])
@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_kernels_compute_the_masked_attention(name, fill, kernel):
    structure, batch, q_len, kv_len = STRUCTURES[name]
    q, k, v = qkv(batch, q_len, kv_len, torch.float64)
    allowed = structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len)
    if fill == "unmasked":  # cuDNN with a bool mask: a row with no allowed key attends every key
        if kernel == "reference":
            pytest.skip("the reference kernel does not reproduce cuDNN's unmasked rows")
        expected = reference.attention(q, k, v, allowed | ~allowed.any(-1, keepdim=True), scale=0.3)
        actual = execute.run(structure, kernel, q, k, v, scale=0.3, enable_gqa=True, fill=fill)
        assert_same(actual, expected)
        return
    expected = reference.attention(q, k, v, allowed, scale=0.3, fill=fill)
    actual = execute.run(structure, kernel, q, k, v, scale=0.3, enable_gqa=True, fill=fill)
    assert_same(actual, expected)


# ------------------------------------------------------------------------- through the compiler: runtime


def gqa_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, repeat_kv(k, H // HKV), repeat_kv(v, H // HKV), attn_mask=mask)


@pytest.mark.parametrize("spelling", ["bool", "-inf", "finfo.min"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_runtime_analysis_matches_the_original(name, dtype, spelling):
    structure, batch, q_len, kv_len = STRUCTURES[name]
    q, k, v = qkv(batch, q_len, kv_len, dtype)
    mask = spell(structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len), spelling, dtype)
    c = Compiled(gqa_sdpa, specialize=False)  # the run-time op (the general graph of a specialized one)
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask), dtype)
    (site,) = c.sites
    assert site.applied == ["gqa", "mask_structure"]
    detail = site.details["mask"]
    assert detail["analysis"] == "runtime" and detail["kind"] == structure.kind
    assert detail["kernel"] == "sdpa.split"


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_specialized_on_the_mask_passed_in(name):
    """By default a mask passed in is read at compile time from the example call and the plan is baked into
    the graph (no per-call Python); every later call checks, once per distinct mask tensor, that its mask
    equals that one, and otherwise runs the graph with the run-time op."""
    structure, batch, q_len, kv_len = STRUCTURES[name]
    q, k, v = qkv(batch, q_len, kv_len)
    mask = structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len).contiguous()
    other = torch.rand(batch, 1, q_len, kv_len, generator=torch.Generator().manual_seed(1)) > 0.3
    other[..., 0] = True
    c = Compiled(gqa_sdpa)
    for m in (mask, mask.clone(), other, mask):
        assert_same(c(q, k, v, m), gqa_sdpa(q, k, v, m))
    (site,) = c.sites
    detail = site.details["mask"]
    assert detail["analysis"] == "specialized" and detail["kind"] == structure.kind
    (guard,) = site.details["specialized_on"]
    assert (guard["checked"], guard["failed"]) == (3, 1)  # mask, its clone (equal), other; mask again: cached
    specialized, general = ([str(n.target) for n in g.graph.nodes] for g in c.graphs)
    assert any("StaticPlan" in t for t in specialized) and not any("structured_attention" in t for t in specialized)
    assert any("structured_attention" in t for t in general)


def test_masks_that_change_every_call_stop_being_checked():
    q, k, v = qkv(2, 8, 8)
    c = Compiled(gqa_sdpa)
    for i in range(7):  # left padding with a different length each call: a new mask every time
        mask = Padding((8, 7 - i % 4), "left", "top_left").materialize(8, 8).expand(2, 1, 8, 8).contiguous()
        assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    (guard,) = c.sites[0].details["specialized_on"]
    assert guard["checked"] == 4 and "stopped" in guard  # then the run-time op alone, no more checks


def test_gradients_through_a_specialized_plan():
    structure, batch, q_len, kv_len = STRUCTURES["padding_right_causal"]
    mask = structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len)
    q, k, v = qkv(batch, q_len, kv_len, requires_grad=True)
    c = Compiled(gqa_sdpa)
    c(q, k, v, mask).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    gqa_sdpa(q, k, v, mask).square().sum().backward()
    assert c.sites[0].details["mask"]["analysis"] == "specialized"
    for a, e in zip(grads, (q.grad, k.grad, v.grad)):
        assert_same(a, e)


@pytest.mark.parametrize("kernel", ["varlen.reference", "reference", "sdpa.split"])
@pytest.mark.parametrize("name", ["padding_left_causal", "padding_right", "padding_right_causal", "block_diagonal",
                                  "block_diagonal_causal", "row_groups_hunyuan_step1", "causal_bottom_right"])
def test_forced_kernels(name, kernel):
    structure, batch, q_len, kv_len = STRUCTURES[name]
    q, k, v = qkv(batch, q_len, kv_len)
    mask = structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len)
    c = Compiled(gqa_sdpa, kernel=kernel)
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    assert c.sites[0].details["mask"]["kernel"] == kernel


def test_multi_head_attention_and_random_masks():
    for seed in range(10):
        torch.manual_seed(seed)
        q, k, v = qkv(2, 6, 8, kv_heads=H)
        mask = torch.rand(2, 1, 6, 8) > 0.5
        c = Compiled(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m))
        assert_same(c(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        torch._dynamo.reset()


def test_rows_without_keys_keep_the_original_value():
    structure, batch, q_len, kv_len = STRUCTURES["padding_left_causal"]
    q, k, v = qkv(batch, q_len, kv_len)
    allowed = structure.materialize(q_len, kv_len)
    for spelling in ("bool", "-inf", "finfo.min"):
        mask = spell(allowed, spelling, torch.float32)
        expected = gqa_sdpa(q, k, v, mask)
        c = Compiled(gqa_sdpa)
        actual = c(q, k, v, mask)
        assert_same(actual, expected)
        empty = ~allowed.any(-1)[:, 0]  # (batch, q_len)
        fill = c.sites[0].details["mask"]
        assert fill["rows_without_keys"] == int(empty.sum())
        if spelling == "finfo.min":  # CPU kernels give uniform weights there: the mean of v
            assert actual[2, :, 0].abs().sum() > 0
        else:
            assert actual[2, :, 0].abs().sum() == 0
        torch._dynamo.reset()


def test_one_plan_shared_by_every_layer_and_call():
    structure, batch, q_len, kv_len = STRUCTURES["row_groups_hunyuan_step2"]
    q, k, v = qkv(batch, q_len, kv_len)
    mask = structure.materialize(q_len, kv_len)

    def layers(q, k, v, mask):
        x = q
        for _ in range(4):
            x = gqa_sdpa(x, k, v, mask)
        return x

    c = Compiled(layers, specialize=False)
    before = (ops.PLANS.stats.misses, ops.PLANS.stats.hits)
    for _ in range(3):
        assert_same(c(q, k, v, mask), layers(q, k, v, mask))
    misses, hits = ops.PLANS.stats.misses - before[0], ops.PLANS.stats.hits - before[1]
    assert misses == 1 and hits == 3  # analysed once; the other 3 layers find it; later calls: each site's fast path
    assert len(c.sites) == 4 and all(s.details["mask"]["kind"] == "row_groups" for s in c.sites)


@pytest.mark.parametrize("specialize", [False, True])
def test_in_place_edit_invalidates_the_plan(specialize):
    q, k, v = qkv(1, 6, 6)
    mask = Causal().materialize(6, 6)
    c = Compiled(gqa_sdpa, specialize=specialize)
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    assert c.sites[0].details["mask"]["kind"] == "causal"
    mask[..., 4:, :] = True  # the same tensor, now a different structure
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    if specialize:  # the check ran again (the version moved) and sent the call to the general graph
        assert c.sites[0].details["specialized_on"][0]["failed"] == 1
    else:
        assert c.sites[0].details["mask"]["kind"] == "row_groups"


@pytest.mark.parametrize("specialize", [False, True])
def test_a_new_mask_at_a_reused_address_is_not_confused(specialize):
    """Each mask is a new tensor over the same memory (same data_ptr, shape, stride, _version 0), as
    when freed memory is handed out again: keying on data_ptr would reuse the wrong plan (or check)."""
    q, k, v = qkv(1, 6, 6)
    patterns = [NoMask().materialize(6, 6), Causal().materialize(6, 6)]
    memory = bytearray(36)
    c = Compiled(gqa_sdpa, specialize=specialize)
    ptrs = set()
    for i in range(6):
        memory[:] = patterns[i % 2].flatten().numpy().tobytes()
        mask = torch.frombuffer(memory, dtype=torch.bool).view(1, 1, 6, 6)
        ptrs.add(mask.data_ptr())
        assert mask._version == 0
        assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
        if not specialize:  # a new mask on every call: after a few, masks are no longer read
            expected = ("none", "causal")[i % 2] if i < ops.STOP_ANALYSING_AFTER else "not read"
            assert c.sites[0].details["mask"]["kind"] == expected
        del mask
        gc.collect()
    assert len(ptrs) == 1


def test_dynamic_shapes_mask_from_sizes():
    def attn(q, k, v):
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        return gqa_sdpa(q, k, v, mask)

    c = Compiled(attn, dynamic=True)
    for n in (5, 9, 12):
        q, k, v = qkv(1, n, n)
        assert_same(c(q, k, v), attn(q, k, v))
    assert len(c.graphs) == 1
    assert c.sites[0].details["mask"]["analysis"] == "runtime"  # keyed on the size, not on a tensor


# --------------------------------------------------------------------------------- static analysis


def hunyuan_step1_mask(t, n):
    s = t + n + 2
    m = torch.ones(s, s, dtype=torch.bool).tril()
    m[t + 1:t + 1 + n, t + 1:t + 1 + n] = True  # written in place: must be seen
    return m


@pytest.mark.parametrize("builder,kind", [
    (lambda: torch.ones(9, 9, dtype=torch.bool).tril(), "causal"),
    (lambda: hunyuan_step1_mask(4, 3), "row_groups"),
    (lambda: torch.arange(9)[None, :] < torch.tensor([9, 6])[:, None, None, None], "padding"),
    (lambda: torch.block_diag(torch.ones(4, 4), torch.ones(5, 5)).bool(), "block_diagonal"),
])
def test_static_analysis_bakes_the_plan_into_the_graph(builder, kind):
    q, k, v = qkv(2, 9, 9)

    def attn(q, k, v):
        return gqa_sdpa(q, k, v, builder())

    c = Compiled(attn)
    assert_same(c(q, k, v), attn(q, k, v))
    (site,) = c.sites
    assert site.details["mask"]["analysis"] == "static" and site.details["mask"]["kind"] == kind
    assert not [n for n in c.sdpa_nodes() if n.kwargs.get("attn_mask") is not None]
    assert "structured_attention" not in " ".join(c.ops())


def test_static_gradients_match():
    q, k, v = qkv(1, 9, 9, requires_grad=True)

    def attn(q, k, v):
        return gqa_sdpa(q, k, v, hunyuan_step1_mask(4, 3))

    c = Compiled(attn)
    g = torch.randn(1, H, 9, D)
    for a, e in zip(torch.autograd.grad(c(q, k, v), (q, k, v), g), torch.autograd.grad(attn(q, k, v), (q, k, v), g)):
        assert_same(a, e)


@pytest.mark.parametrize("name", ["block_diagonal", "row_groups_hunyuan_step2", "padding_left_causal"])
def test_runtime_gradients_match(name):
    structure, batch, q_len, kv_len = STRUCTURES[name]
    q, k, v = qkv(batch, q_len, kv_len, requires_grad=True)
    mask = structure.materialize(q_len, kv_len)
    c = Compiled(gqa_sdpa)
    g = torch.randn(batch, H, q_len, D)
    actual = torch.autograd.grad(c(q, k, v, mask), (q, k, v), g)
    expected = torch.autograd.grad(gqa_sdpa(q, k, v, mask), (q, k, v), g)
    for a, e in zip(actual, expected):
        assert_same(a, e)


# ------------------------------------------------------------------------------------------ refusals


def test_dropout_and_random_masks_are_refused():
    q, k, v = qkv(1, 6, 6)

    def rand_mask(q, k, v):
        return gqa_sdpa(q, k, v, torch.rand(6, 6) > 0.5)

    c = Compiled(rand_mask)
    c(q, k, v)
    (site,) = c.sites
    assert "mask_structure" not in site.applied and "random op" in site.reason


def test_a_static_bias_is_refused():
    q, k, v = qkv(1, 6, 6)

    def biased(q, k, v):
        return gqa_sdpa(q, k, v, torch.arange(6.0)[None, :] * -0.5)  # ALiBi-like: not a mask

    c = Compiled(biased)
    assert_same(c(q, k, v), biased(q, k, v))
    assert "additive bias" in c.sites[0].reason


# ------------------------------------------------------------------------------------ the custom op


def test_opcheck_structured_attention():
    state = ops.SiteRuntime(("opcheck", 0), {"bool": "zero", "-inf": "zero", "finfo.min": "mean_v"})
    site_id = ops.register(state, keepalive=[])
    structure, batch, q_len, kv_len = STRUCTURES["padding_left_causal"]
    q, k, v = qkv(batch, q_len, kv_len, requires_grad=True)
    mask = structure.materialize(q_len, kv_len)
    args = (q, k, v, mask, [mask], [], site_id, None, True)
    torch.library.opcheck(torch.ops.attnfx.structured_attention.default, args)
    del state


# ------------------------------------------------------------------------------ FlexAttention, autotune


@pytest.mark.parametrize("name", ["padding_right", "padding_left_causal", "row_groups_hunyuan_step2", "block_diagonal"])
def test_flex_kernel(name):
    structure, batch, q_len, kv_len = STRUCTURES[name]
    q, k, v = qkv(batch, q_len, kv_len)
    mask = structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len)
    c = Compiled(gqa_sdpa, kernel="flex")
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    assert c.sites[0].details["mask"]["kernel"] == "flex"


def test_flex_for_a_mask_without_structure():
    q, k, v = qkv(2, 8, 8)
    mask = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[..., 0] = True
    c = Compiled(gqa_sdpa, kernel="flex")
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    detail = c.sites[0].details["mask"]
    assert detail["kind"] == "general" and detail["kernel"] == "flex"


def test_autotune_times_the_exact_candidates_and_keeps_the_fastest():
    structure, batch, q_len, kv_len = STRUCTURES["row_groups_hunyuan_step1"]
    q, k, v = qkv(batch, q_len, kv_len)
    mask = structure.materialize(q_len, kv_len)
    c = Compiled(gqa_sdpa, autotune=True)
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    detail = c.sites[0].details["mask"]
    assert detail["why"].startswith("autotuned: ")
    timed = detail["why"][len("autotuned: "):].split(", ")
    assert {t.split(" ")[0] for t in timed} == {"dense", "sdpa.split", "flex"}  # the candidates on CPU
    assert detail["kernel"] == timed[0].split(" ")[0].replace("dense", "sdpa (dense mask kept)")
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))  # the chosen kernel stays exact


def test_autotune_on_a_constant_mask_plans_it_once():
    q, k, v = qkv(1, 9, 9)

    def attn(q, k, v):
        return gqa_sdpa(q, k, v, hunyuan_step1_mask(4, 3))

    c = Compiled(attn, autotune=True)
    for _ in range(3):
        assert_same(c(q, k, v), attn(q, k, v))
    assert c.sites[0].details["mask"]["why"].startswith("autotuned")


def test_a_kernel_that_fails_at_run_time_falls_back_to_the_dense_mask(monkeypatch):
    from attnfx.backends import flex

    def broken(*a, **kw):
        raise RuntimeError("cannot lower")

    monkeypatch.setattr(flex, "attention", broken)
    structure, batch, q_len, kv_len = STRUCTURES["padding_right"]
    q, k, v = qkv(batch, q_len, kv_len)
    mask = structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len)
    c = Compiled(gqa_sdpa, kernel="flex")
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    assert "flex failed here (RuntimeError)" in c.sites[0].details["mask"]["why"]
