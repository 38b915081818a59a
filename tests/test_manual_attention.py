"""manual_attention pattern: softmax(q kᵀ · scale + mask) v as eager code writes it becomes SDPA, exactly;
anything that changes the math is refused with a reason."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import Compiled, assert_same, repeat_kv

from attnfx.fx.graph import op_name

B, H, HKV, L, S, D = 2, 4, 2, 6, 6, 16
Compiled = partial(Compiled, patterns=["manual_attention", "gqa"])  # these two patterns alone


def hf_eager(q, k, v, mask, training=False):
    """transformers' eager_attention_forward, verbatim in structure."""
    k, v = repeat_kv(k, H // k.shape[1]), repeat_kv(v, H // v.shape[1])
    w = torch.matmul(q, k.transpose(2, 3)) * D**-0.5
    if mask is not None:
        w = w + mask[:, :, :, : k.shape[-2]]
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    w = F.dropout(w, p=0.0, training=training)
    return torch.matmul(w, v).transpose(1, 2).contiguous()


def hf_mask(dtype, padded=True):
    allowed = torch.ones(B, 1, L, S, dtype=torch.bool).tril()
    if padded:
        allowed[1, :, :, :2] = False  # left padding of row 1
    return torch.where(allowed, torch.tensor(0.0, dtype=dtype), torch.finfo(dtype).min)


def inputs(dtype=torch.float32, kv_heads=HKV, requires_grad=False):
    q = torch.randn(B, H, L, D, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, kv_heads, S, D, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, kv_heads, S, D, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def check(fn, *args, patterns=("manual_attention", "gqa"), dtype=torch.float32):
    c = Compiled(fn)
    assert_same(c(*args), fn(*args), dtype)
    (site,) = c.sites
    assert site.kind == "manual"
    assert site.patterns == list(patterns) and site.rewritten, site.reason
    assert "softmax" not in c.ops() and "matmul" not in c.ops()
    assert len(c.sdpa_nodes()) == 1
    return site, c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_eager_attention(dtype):
    q, k, v = inputs(dtype)
    site, c = check(hf_eager, q, k, v, hf_mask(dtype), dtype=dtype)
    assert "attn_mask=float" in site.target and "enable_gqa=True" in site.target
    assert site.details["scale"] == pytest.approx(D**-0.5)
    # the mask is a graph input: it may hold -inf, so rows with no key are guarded to stay NaN
    assert "NaN" in site.reason


def test_mask_built_in_the_graph_from_finfo_min_needs_no_nan_guard():
    q, k, v = inputs()
    lengths = torch.tensor([S, S - 2])

    def attn(q, k, v, lengths):
        allowed = torch.arange(S)[None, :] < lengths[:, None]
        mask = torch.where(allowed, 0.0, torch.finfo(q.dtype).min)[:, None, None, :]
        return hf_eager(q, k, v, mask)

    site, c = check(attn, q, k, v, lengths)
    assert "NaN" not in site.reason and "mean of v" in site.reason
    assert "masked_fill" not in c.ops()
    # the guard's mean of v is taken on the un-expanded v: the K/V copies are still gone
    assert site.savings["kv_expansion_bytes"] == 2 * B * H * S * D * 4
    assert "expand" not in c.ops()


def _zero_no_key_rows_like_cuda(q, k, v, attn_mask=None, **kw):
    """SDPA as CUDA's efficient/cuDNN kernels behave: a row whose float mask is all finfo.min gives 0."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        out = out.masked_fill((attn_mask == torch.finfo(attn_mask.dtype).min).all(-1, keepdim=True), 0.0)
    return out


def test_rows_of_finfo_min_keep_eager_result_on_a_kernel_that_zeroes_them():
    q, k, v = inputs()
    mask = hf_mask(torch.float32)  # left padding: rows 0 and 1 of batch 1 have no allowed key
    expected = hf_eager(q, k, v, mask)

    def swap_sdpa(gm, example_inputs):
        for n in gm.graph.nodes:
            if op_name(n) == "sdpa":
                n.target = _zero_no_key_rows_like_cuda
        gm.recompile()
        return gm.forward

    c = Compiled(lambda q, k, v, m: hf_eager(q, k, v, m), compiler=swap_sdpa)
    assert_same(c(q, k, v, mask), expected)
    assert c.sites[0].rewritten
    alone = _zero_no_key_rows_like_cuda(q, k, v, mask, enable_gqa=True)
    assert alone[1, :, 0].abs().sum() == 0  # the kernel alone would differ from eager on that row


def test_hf_eager_rows_with_no_key_keep_uniform_weights():
    q, k, v = inputs()
    mask = hf_mask(torch.float32)
    mask[0, :, 3] = torch.finfo(torch.float32).min  # a row with no allowed key: eager gives mean(v)
    check(hf_eager, q, k, v, mask)


def test_masked_fill_minus_inf_keeps_nan_rows():
    q, k, v = inputs(kv_heads=H)
    allowed = torch.rand(B, 1, L, S) > 0.4
    allowed[0, 0, 2] = False  # no key: NaN in eager

    def attn(q, k, v, allowed):
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(allowed == 0, float("-inf"))
        return s.softmax(dim=-1) @ v

    expected = attn(q, k, v, allowed)
    assert expected[0, :, 2].isnan().all()
    site, _ = check(attn, q, k, v, allowed, patterns=("manual_attention",))
    assert "NaN" in site.reason and "attn_mask=bool" in site.target


def test_where_minus_inf():
    q, k, v = inputs(kv_heads=H)
    allowed = torch.ones(L, S, dtype=torch.bool).tril()

    def attn(q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * 0.3
        return torch.matmul(torch.where(allowed, s, float("-inf")).softmax(-1), v)

    check(attn, q, k, v, patterns=("manual_attention",))


def test_masked_fill_finfo_min():
    q, k, v = inputs(kv_heads=H)
    excluded = torch.rand(B, 1, L, S) > 0.6
    excluded[1, 0, 4] = True

    def attn(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.25
        s = s.masked_fill(excluded, torch.finfo(s.dtype).min)
        return torch.softmax(s, -1) @ v

    check(attn, q, k, v, patterns=("manual_attention",))


def test_scale_after_additive_mask_scales_the_mask():
    q, k, v = inputs(kv_heads=H)
    bias = torch.randn(1, H, L, S)  # an ALiBi-like bias: SDPA's float mask carries it

    def attn(q, k, v):
        return ((q @ k.transpose(-1, -2) + bias) * 0.125).softmax(-1) @ v

    check(attn, q, k, v, patterns=("manual_attention",))


def test_prescaled_query_and_dropout_in_eval():
    q, k, v = inputs()

    def attn(q, k, v):
        s = (q * D**-0.5) @ repeat_kv(k, 2).transpose(-1, -2)
        p = F.dropout(s.float().softmax(-1).to(q.dtype), p=0.1, training=False)
        return p @ repeat_kv(v, 2)

    site, _ = check(attn, q, k, v)
    assert site.details["scale"] == 1.0


def test_diffusers_baddbmm_processor():
    """diffusers' AttnProcessor: baddbmm(mask, q, kᵀ, beta=1, alpha=scale), softmax, bmm (3-D)."""
    q, k, v = (torch.randn(B * H, L, D) for _ in range(3))
    mask = torch.randn(B * H, 1, S)

    def attn(q, k, v):
        scores = torch.baddbmm(mask, q, k.transpose(-1, -2), beta=1, alpha=D**-0.5)
        return torch.bmm(scores.softmax(dim=-1), v)

    check(attn, q, k, v, patterns=("manual_attention",))


def test_symbolic_inverse_sqrt_scale_under_dynamic_shapes():
    def attn(q, k, v):
        return ((q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5).softmax(-1) @ v

    c = Compiled(attn, dynamic=True)
    for length in (5, 8):
        q, k, v = (torch.randn(B, H, length, D) for _ in range(3))
        assert_same(c(q, k, v), attn(q, k, v))
    assert len(c.graphs) == 1
    (site,) = c.sites
    assert site.rewritten and site.details["scale"] == "1/sqrt(head_dim)"


def test_gradients_match_in_training():
    q, k, v = inputs(requires_grad=True)
    mask = hf_mask(torch.float32)
    c = Compiled(lambda q, k, v: hf_eager(q, k, v, mask, training=True))
    grad = torch.randn(B, L, H, D)
    # Query rows with no allowed key (left padding) get no gradient from a real loss; kernels differ
    # in what they would back-propagate there (see README, "Exactness"), so the test, like training, sends none.
    no_key = (mask == torch.finfo(torch.float32).min).all(-1)[:, 0]  # (B, L)
    grad[no_key] = 0
    expected = torch.autograd.grad(hf_eager(q, k, v, mask, training=True), (q, k, v), grad)
    actual = torch.autograd.grad(c(q, k, v), (q, k, v), grad)
    assert c.sites[0].rewritten
    for a, e in zip(actual, expected):
        assert_same(a, e)


def falcon_4x_attention(q, k, v, mask):
    """transformers 4.x Falcon's eager attention: the scores are scaled in place (``/=``), the mask added after."""
    attention_scores = q @ k.transpose(-1, -2)
    attention_scores /= math.sqrt(D)
    attention_scores = F.softmax(attention_scores + mask, dim=-1, dtype=q.dtype)
    return attention_scores @ v


def falcon_4x_alibi_attention(q, k, v, mask, alibi):
    """transformers 4.x Falcon with ALiBi: scores (B, H, L, S) plus alibi, then ``*=`` the scale in place."""
    attention_scores = (q @ k.transpose(-1, -2)).view(B, H, L, S)
    attention_logits = attention_scores + alibi.view(B, H, 1, -1)
    attention_logits *= D**-0.5
    attention_probs = F.softmax(attention_logits + mask, dim=-1, dtype=q.dtype)
    return (attention_probs.view(B, H, L, S) @ v).flatten(0, 1)


def test_falcon_in_place_scale():
    q, k, v = inputs(kv_heads=H)
    site, _ = check(falcon_4x_attention, q, k, v, hf_mask(torch.float32), patterns=("manual_attention",))
    assert site.details["scale"] == pytest.approx(D**-0.5)


def test_falcon_alibi_in_place_scale_applies_to_the_bias():
    q, k, v = inputs(kv_heads=H)
    alibi = torch.randn(B * H, 1, S)
    check(falcon_4x_alibi_attention, q, k, v, hf_mask(torch.float32), alibi, patterns=("manual_attention",))


@pytest.mark.parametrize("spelling", ["div_", "mul_", "itruediv", "imul_isub", "sub"])
def test_in_place_scale_and_shift_spellings(spelling):
    q, k, v = inputs(kv_heads=H)
    bias = torch.randn(1, H, L, S)

    def attn(q, k, v):
        s = q @ k.transpose(-1, -2)
        if spelling == "div_":
            s.div_(4.0)  # the result is dropped: softmax reads s, written in place
        elif spelling == "mul_":
            s.mul_(0.25).add_(bias)
        elif spelling == "itruediv":
            s /= 4.0
        elif spelling == "imul_isub":
            s *= 0.25
            s -= 3.0  # a shift: softmax ignores it
        else:
            s = s * 0.25 - bias
        return torch.softmax(s, -1) @ v

    site, _ = check(attn, q, k, v, patterns=("manual_attention",))
    assert site.details["scale"] == 0.25


def test_xlm_masked_fill_in_place_whose_result_is_dropped():
    """XLM/Flaubert: ``scores.masked_fill_(mask, finfo.min)`` then ``softmax(scores.float()).type_as(scores)``."""
    q, k, v = inputs(kv_heads=H)
    padding = torch.tensor([[1] * S, [0, 0] + [1] * (S - 2)])

    def attn(q, k, v, padding):
        scores = torch.matmul(q / math.sqrt(D), k.transpose(2, 3))
        mask = (padding == 0).view(B, 1, 1, S).expand_as(scores)
        scores.masked_fill_(mask, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        return torch.matmul(F.dropout(weights, p=0.1, training=False), v)

    site, c = check(attn, q, k, v, padding, patterns=("manual_attention",))
    assert "masked_fill_" not in c.ops()


def test_in_place_writes_under_dynamic_shapes_leave_no_score_node():
    def attn(q, k, v, padding):
        scores = torch.matmul(q, k.transpose(2, 3))
        scores /= q.size(-1) ** 0.5
        mask = (padding == 0).view(q.shape[0], 1, 1, k.shape[2]).expand_as(scores)
        scores.masked_fill_(mask, torch.finfo(scores.dtype).min)
        return torch.matmul(torch.softmax(scores.float(), dim=-1).type_as(scores), v)

    c = Compiled(attn, dynamic=True)
    for length in (6, 9):
        q, k, v = (torch.randn(B, H, length, D) for _ in range(3))
        padding = torch.ones(B, length, dtype=torch.long)
        padding[1, :2] = 0
        assert_same(c(q, k, v, padding), attn(q, k, v, padding))
    assert len(c.graphs) == 1 and c.sites[0].rewritten
    assert not {"matmul", "div", "masked_fill", "expand_as"} & set(c.ops())  # the writes went with the scores


def bloom_attention(q3, k3, v3, alibi, mask):
    """transformers' Bloom eager attention: (B·H, L, D) operands, ``alibi.baddbmm`` with keyword arguments, a
    view to (B, H, L, S) for the mask and the float32 softmax, dropout, a view back to (B·H, L, S), ``bmm``."""
    scores = alibi.baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=1.0, alpha=D**-0.5)
    w = scores.view(B, H, L, -1) + mask
    p = F.softmax(w, dim=-1, dtype=torch.float32).to(q3.dtype)
    p = F.dropout(p, p=0.0, training=False)
    return torch.bmm(p.view(B * H, L, -1), v3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bloom_batch_heads_views_and_alibi(dtype):
    q3, k3, v3 = (torch.randn(B * H, n, D, dtype=dtype) for n in (L, S, S))
    alibi = (torch.arange(S, dtype=dtype)[None, None, :] * -torch.rand(B * H, 1, 1, dtype=dtype))
    site, c = check(bloom_attention, q3, k3, v3, alibi, hf_mask(dtype), patterns=("manual_attention",),
                    dtype=dtype)
    (sdpa,) = c.sdpa_nodes()
    assert sdpa.meta["example_value"].shape == (B, H, L, D)  # SDPA runs on the (B, H) split


def test_batch_heads_views_under_dynamic_shapes():
    def attn(q3, k3, v3):
        b = q3.shape[0] // H
        s = torch.bmm(q3, k3.transpose(1, 2)).view(b, H, q3.shape[1], -1) * 0.25
        return torch.bmm(s.softmax(-1).flatten(0, 1), v3)

    c = Compiled(attn, dynamic=True)
    for batch, length in ((2, 5), (3, 8)):
        q3, k3, v3 = (torch.randn(batch * H, length, D) for _ in range(3))
        assert_same(c(q3, k3, v3), attn(q3, k3, v3))
    assert all(site.rewritten for site in c.sites)


# ------------------------------------------------------------------------------------------- refusals


def refused(fn, *args):
    c = Compiled(fn)
    out, ref = c(*args), fn(*args)
    for a, e in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert_same(a, e)
    (site,) = c.sites
    assert site.kind == "manual" and site.patterns == ["manual_attention"] and not site.rewritten
    assert "softmax" in c.ops()
    return site


def test_soft_capping_is_refused():
    q, k, v = inputs(kv_heads=H)

    def attn(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.25
        s = torch.tanh(s / 50.0) * 50.0
        return s.softmax(-1) @ v

    assert "soft-capping" in refused(attn, q, k, v).reason


def test_attention_sinks_are_refused():
    q, k, v = inputs(kv_heads=H)
    sinks = torch.randn(1, H, L, 1)

    def attn(q, k, v):
        s = torch.cat([q @ k.transpose(-1, -2) * 0.25, sinks.expand(B, -1, -1, -1)], dim=-1)
        return s.softmax(-1)[..., :-1] @ v

    assert "sinks" in refused(attn, q, k, v).reason or "pass through" in refused(attn, q, k, v).reason


def test_active_dropout_is_refused():
    q, k, v = inputs(kv_heads=H)

    def attn(q, k, v):
        return F.dropout((q @ k.transpose(-1, -2)).softmax(-1), p=0.0, training=True) @ v, \
            F.dropout((q @ k.transpose(-1, -2)).softmax(-1), p=0.5, training=True).shape

    c = Compiled(lambda q, k, v: F.dropout((q @ k.transpose(-1, -2)).softmax(-1), p=0.5, training=True) @ v)
    c(q, k, v)
    (site,) = c.sites
    assert not site.rewritten and "dropout p=0.5" in site.reason


def test_returned_probabilities_are_refused():
    q, k, v = inputs(kv_heads=H)

    def attn(q, k, v):
        p = (q @ k.transpose(-1, -2) * 0.25).softmax(-1)
        return p @ v, p

    assert "also used elsewhere" in refused(attn, q, k, v).reason


def test_other_finite_fill_is_refused():
    q, k, v = inputs(kv_heads=H)
    excluded = torch.rand(B, 1, L, S) > 0.5

    def attn(q, k, v):
        return (q @ k.transpose(-1, -2)).masked_fill(excluded, -1e9).softmax(-1) @ v

    assert "-1000000000.0" in refused(attn, q, k, v).reason


def test_softmax_over_queries_is_refused():
    q, k, v = inputs(kv_heads=H)
    assert "dim -2" in refused(lambda q, k, v: (q @ k.transpose(-1, -2)).softmax(-2) @ v, q, k, v).reason


def test_mask_in_another_dtype_is_refused():
    q, k, v = inputs(torch.bfloat16, kv_heads=H)
    mask = torch.randn(B, 1, L, S)  # float32 mask added to bf16 scores: eager promotes, SDPA cannot

    def attn(q, k, v):
        return ((q @ k.transpose(-1, -2)) + mask).softmax(-1).to(q.dtype) @ v

    c = Compiled(attn)
    assert_same(c(q, k, v), attn(q, k, v), torch.bfloat16)
    (site,) = c.sites
    assert not site.rewritten and "float32 while q is torch.bfloat16" in site.reason


def test_non_attention_softmax_is_not_a_site():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    c = Compiled(lambda x: torch.topk((x @ w).softmax(-1), 2).values)
    c(x)
    assert len(c.sites) == 0


def test_other_views_of_the_scores_are_refused():
    q3, k3, v3 = (torch.randn(B * H, n, D) for n in (L, S, S))

    def attn(q3, k3, v3):  # keys and queries mixed into one axis: not a batch×heads split
        s = torch.bmm(q3, k3.transpose(1, 2)).view(B * H, L // 2, 2 * S)
        return torch.bmm(s.softmax(-1).view(B * H, L, S), v3)

    assert "reshaped" in refused(attn, q3, k3, v3).reason


def test_in_place_write_into_scores_read_elsewhere_is_refused():
    q, k, v = inputs(kv_heads=H)

    def attn(q, k, v):
        s = q @ k.transpose(-1, -2)
        raw = s.view(-1)  # a view of the scores, returned: it sees the write below
        s.div_(4.0)
        return torch.softmax(s, -1) @ v, raw

    assert "written in place" in refused(attn, q, k, v).reason


def test_in_place_write_into_an_input_is_refused():
    q, k, v = inputs(kv_heads=H)

    def attn(q, k, v, bias):
        bias += q @ k.transpose(-1, -2)  # writes into the caller's tensor
        return torch.softmax(bias, -1) @ v

    c = Compiled(attn)
    bias1, bias2 = torch.randn(B, H, L, S), None
    bias2 = bias1.clone()
    assert_same(c(q, k, v, bias1), attn(q, k, v, bias2))
    assert_same(bias1, bias2)
    (site,) = c.sites
    assert not site.rewritten and "did not create" in site.reason


def test_write_into_v_while_attention_reads_it_is_refused():
    q, k, v = inputs(kv_heads=H)

    def attn(q, k, v):
        v = v * 1.0
        p = torch.softmax(q @ k.transpose(-1, -2), -1)
        v.mul_(2.0)  # after the scores, before the output matmul: SDPA would read the doubled v too early
        return p @ v

    assert "written in place" in refused(attn, q, k, v).reason
