"""gqa pattern: every spelling of K/V head expansion is removed exactly; the wrong ones are refused."""

import pytest
import torch
import torch.nn.functional as F
from functools import partial

from helpers import Compiled, assert_same, repeat_kv

from attnfx.patterns import gqa
from attnfx.patterns._layout import trace
from attnfx.fx.graph import op_name, sdpa_args

B, HKV, N, L, S, D = 2, 2, 3, 5, 7, 16
Compiled = partial(Compiled, patterns=["gqa"])  # this module tests gqa alone
H = HKV * N


# each spelling: (layout of the K/V it receives, function to the (B, H, S, D) tensor SDPA gets)
def hf_repeat_kv(x, n=N):
    return repeat_kv(x, n)



SPELLINGS = {
    "hf_repeat_kv": ("bhsd", hf_repeat_kv),
    "hf_repeat_kv_contiguous": ("bhsd", lambda x: hf_repeat_kv(x).contiguous()),
    "unsqueeze_expand_flatten": ("bhsd", lambda x: x.unsqueeze(2).expand(-1, -1, N, -1, -1).flatten(1, 2)),
    "repeat_interleave": ("bhsd", lambda x: x.repeat_interleave(N, dim=1)),
    "torch_repeat_interleave_output_size": (
        "bhsd", lambda x: torch.repeat_interleave(x, N, dim=1, output_size=x.shape[1] * N)),
    "grouped_repeat": ("bhsd", lambda x: x[:, :, None].repeat(1, 1, N, 1, 1).reshape(x.shape[0], -1, *x.shape[2:])),
    "bshd_expand_permute": ("bshd", lambda x: x[:, :, :, None, :].expand(B, S, HKV, N, D)
                            .reshape(B, S, H, D).permute(0, 2, 1, 3)),
    "bshd_expand_transpose_contiguous": ("bshd", lambda x: x[:, :, :, None, :].expand(B, S, HKV, N, D)
                                         .reshape(B, S, H, D).transpose(1, 2).contiguous()),
    "bshd_repeat_interleave_transpose": ("bshd", lambda x: x.repeat_interleave(N, dim=2).transpose(1, 2)),
    "packed_grouped_repeat": ("thd", lambda x: x[:, :, None, :].repeat(1, 1, N, 1).reshape(S, H, D)
                              .transpose(0, 1).unsqueeze(0)),
}


def make_kv(layout, dtype, batch=B, kv_heads=HKV, length=S):
    shape = {"bhsd": (batch, kv_heads, length, D), "bshd": (batch, length, kv_heads, D), "thd": (length, kv_heads, D)}
    return torch.randn(shape[layout], dtype=dtype), torch.randn(shape[layout], dtype=dtype)


def make_mask(kind, batch, dtype, q_len=L, kv_len=S):
    if kind == "none":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    allowed = torch.rand(batch, 1, q_len, kv_len) > 0.3
    allowed[..., 0] = True
    if kind == "bool":
        return {"attn_mask": allowed}
    return {"attn_mask": torch.where(allowed, 0.0, -1e4).to(dtype) + 0.1 * torch.randn(batch, 1, q_len, kv_len, dtype=dtype)}


@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_spelling_is_rewritten_exactly(spelling, mask):
    layout, expand = SPELLINGS[spelling]
    batch = 1 if layout == "thd" else B
    dtype = torch.float32
    q = torch.randn(batch, H, L if mask != "causal" else S, D, dtype=dtype)
    k, v = make_kv(layout, dtype, batch)
    kw = make_mask(mask, batch, dtype, q_len=q.shape[2])

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, expand(k), expand(v), **kw)

    c = Compiled(attn)
    assert_same(c(q, k, v), attn(q, k, v))
    (site,) = c.sites
    assert site.patterns == ["gqa"] and site.rewritten, site.reason
    assert "enable_gqa=True" in site.target
    assert site.details["n_rep"] == N and site.details["kv_heads"] == HKV
    assert site.savings["kv_expansion_bytes"] == 2 * batch * H * S * D * 4
    assert not {"expand", "repeat", "repeat_interleave"} & set(c.ops())
    (node,) = c.sdpa_nodes()
    assert tuple(sdpa_args(node)["key"].meta["example_value"].shape[-3:]) == (HKV, S, D)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    q = torch.randn(B, H, L, D, dtype=dtype)
    k, v = make_kv("bhsd", dtype)
    mask = make_mask("bool", B, dtype)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, hf_repeat_kv(k), hf_repeat_kv(v), **mask)

    c = Compiled(attn)
    assert_same(c(q, k, v), attn(q, k, v))
    assert c.sites[0].rewritten


def test_multi_query_attention():
    q = torch.randn(B, 4, L, D)
    k, v = make_kv("bhsd", torch.float32, kv_heads=1)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, hf_repeat_kv(k, 4), hf_repeat_kv(v, 4))

    c = Compiled(attn)
    assert_same(c(q, k, v), attn(q, k, v))
    assert c.sites[0].rewritten and c.sites[0].details["kv_heads"] == 1


def test_rows_with_no_allowed_key_match_the_original():
    q = torch.randn(B, H, L, D)
    k, v = make_kv("bhsd", torch.float32)
    allowed = torch.ones(B, 1, L, S, dtype=torch.bool).tril()
    allowed[:, :, 2] = False

    def attn(q, k, v, m):
        return F.scaled_dot_product_attention(q, hf_repeat_kv(k), hf_repeat_kv(v), attn_mask=m)

    c = Compiled(attn)
    expected = attn(q, k, v, allowed)
    assert_same(c(q, k, v, allowed), expected)
    assert c.sites[0].rewritten


def test_gradients_match():
    q = torch.randn(B, H, L, D, requires_grad=True)
    k = torch.randn(B, HKV, S, D, requires_grad=True)
    v = torch.randn(B, HKV, S, D, requires_grad=True)
    mask = torch.randn(B, 1, L, S)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, hf_repeat_kv(k), hf_repeat_kv(v), attn_mask=mask)

    c = Compiled(attn)
    grad = torch.randn(B, H, L, D)
    expected = torch.autograd.grad(attn(q, k, v), (q, k, v), grad)
    actual = torch.autograd.grad(c(q, k, v), (q, k, v), grad)
    assert c.sites[0].rewritten
    for a, e in zip(actual, expected):
        assert_same(a, e)


def test_dynamic_shapes_one_graph_serves_every_length():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, hf_repeat_kv(k), hf_repeat_kv(v), is_causal=True)

    c = Compiled(attn, dynamic=True)
    for length in (7, 9, 12):
        q = torch.randn(B, H, length, D)
        k, v = make_kv("bhsd", torch.float32, length=length)
        assert_same(c(q, k, v), attn(q, k, v))
    assert len(c.graphs) == 1
    assert c.sites[0].rewritten
    assert not {"expand", "reshape"} & set(c.ops())


def test_automatic_dynamic_recompile_is_rewritten_too():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, hf_repeat_kv(k), hf_repeat_kv(v))

    c = Compiled(attn)
    for length in (7, 9, 11):
        q = torch.randn(B, H, length, D)
        k, v = make_kv("bhsd", torch.float32, length=length)
        assert_same(c(q, k, v), attn(q, k, v))
    assert len(c.graphs) == 2 and c.report.graphs == 2
    # the static graph (length 7) and the dynamic one (every other length) are both live: both listed
    assert [s.details["shape"] for s in c.sites] == ["2x6x7x16", "2x6xs52x16"] or len(c.sites) == 2
    assert all(s.rewritten for s in c.sites)


# ------------------------------------------------------------------------------------------- refusals


def _run_refused(attn, *inputs):
    c = Compiled(attn)
    assert_same(c(*inputs), attn(*inputs))
    (site,) = c.sites
    assert site.patterns == ["gqa"] and site.applied == [] and not site.rewritten
    return site, c


def test_tiled_head_order_is_refused():
    q = torch.randn(B, H, L, D)
    k, v = make_kv("bhsd", torch.float32)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat(1, N, 1, 1), v.repeat(1, N, 1, 1))

    site, c = _run_refused(attn, q, k, v)
    assert "tiled" in site.reason
    assert "repeat" in c.ops()


def test_only_key_expanded_is_refused():
    q = torch.randn(B, H, L, D)
    k, _ = make_kv("bhsd", torch.float32)
    v = torch.randn(B, H, S, D)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, hf_repeat_kv(k), v)

    site, _ = _run_refused(attn, q, k, v)
    assert "only one of K and V" in site.reason


def test_dropout_is_refused():
    q = torch.randn(B, H, L, D)
    k, v = make_kv("bhsd", torch.float32)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, hf_repeat_kv(k), hf_repeat_kv(v), dropout_p=0.5)

    c = Compiled(attn)
    c(q, k, v)
    (site,) = c.sites
    assert not site.rewritten and "dropout_p=0.5" in site.reason


def test_expansion_along_batch_and_heads_is_refused():
    q = torch.randn(B, H, L, D)
    k, v = make_kv("bhsd", torch.float32, batch=1)

    def attn(q, k, v):
        def ex(x):
            return x[:, :, None].expand(B, HKV, N, S, D).reshape(B, H, S, D)
        return F.scaled_dot_product_attention(q, ex(k), ex(v))

    site, _ = _run_refused(attn, q, k, v)
    assert "non-head axis" in site.reason


def test_expanded_kv_used_elsewhere_is_rewritten_with_a_caveat():
    q = torch.randn(B, H, L, D)
    k, v = make_kv("bhsd", torch.float32)

    def attn(q, k, v):
        ke = hf_repeat_kv(k)
        return F.scaled_dot_product_attention(q, ke, hf_repeat_kv(v)), ke.sum()

    c = Compiled(attn)
    out, s = c(q, k, v)
    ref, rs = attn(q, k, v)
    assert_same(out, ref) and assert_same(s, rs)
    (site,) = c.sites
    assert site.rewritten and "also used elsewhere" in site.reason
    assert site.savings["kv_expansion_bytes"] == B * H * S * D * 4  # only V's copy is gone


def test_mha_site_is_reported_untouched():
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    c = Compiled(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    c(q, k, v)
    (site,) = c.sites
    assert not site.rewritten and site.patterns == [] and "no pattern applies" in site.reason
    assert site.target.startswith("unchanged")


# --------------------------------------------------------------------------------------- the algebra


def _captured_key(fn, *inputs):
    c = Compiled(fn, patterns=[])
    c(*inputs)
    (node,) = c.sdpa_nodes()
    return sdpa_args(node)["key"]


def test_layout_of_hf_repeat_kv_is_grouped():
    q = torch.randn(B, H, L, D)
    k, v = make_kv("bhsd", torch.float32)
    key = _captured_key(lambda q, k, v: F.scaled_dot_product_attention(q, hf_repeat_kv(k), hf_repeat_kv(v)), q, k, v)
    exp = gqa.find_expansion(key)
    assert [[repr(a) for a in d] for d in exp.layout] == [["src0"], ["src1", "rep3"], ["src2"], ["src3"]]
    assert exp.n_rep == N and exp.kv_heads == HKV and exp.source.op == "placeholder"
    # the undo needs no op at all: SDPA reads the placeholder itself
    assert gqa._undo_cost(exp)[0] == 0


def test_layout_of_tiled_repeat_is_tiled():
    q = torch.randn(B, H, L, D)
    k, v = make_kv("bhsd", torch.float32)
    key = _captured_key(lambda q, k, v: F.scaled_dot_product_attention(q, k.repeat(1, N, 1, 1), v.repeat(1, N, 1, 1)),
                        q, k, v)
    (src, layout, chain), = trace(key)
    assert [repr(a) for a in layout[1]] == ["rep3", "src1"]
    assert "tiled" in gqa.find_expansion(key)


def test_a_dim_split_is_not_a_movement_we_read():
    q = torch.randn(B, H, L, D)
    kk = torch.randn(B, S, HKV * D)

    def attn(q, kk):
        k = kk.view(B, S, HKV, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, hf_repeat_kv(k), hf_repeat_kv(k))

    key = _captured_key(attn, q, kk)
    exp = gqa.find_expansion(key)
    # the split view stays part of the source; the expansion after it is still found
    assert exp is not None and not isinstance(exp, str)
    assert op_name(exp.source) in ("transpose", "reshape", None)
