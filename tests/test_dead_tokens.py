"""dead_tokens: query rows nobody reads and key columns nobody may attend are not computed — exact on
every row that is read; when liveness cannot be proven, nothing is dropped."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import Compiled, assert_same

from attnfx.rewriter.graph import op_name, sdpa_args

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import hunyuan_image3 as hy  # noqa: E402

T, N = 20, 64
S = T + N + 2


def attention_inputs(c):
    """(query rows, key columns) the attention call of the compiled graph receives (SDPA, a static plan or
    the run-time op: all take q, k, v first)."""
    for g in c.graphs:
        for n in g.graph.nodes:
            name = getattr(n.target, "__name__", str(n.target))
            if op_name(n) == "sdpa" or (n.op == "call_function" and "attention" in name):
                a = sdpa_args(n) if op_name(n) == "sdpa" else dict(zip(("query", "key"), n.args))
                return a["query"].meta["example_value"].shape[-2], a["key"].meta["example_value"].shape[-2]


@pytest.fixture
def models():
    return hy.make(hy.SMALL), hy.make(hy.SMALL)


@pytest.mark.parametrize("read", ["masked_select", "slice"])
def test_hunyuan_step1_eoi_and_text_rows_are_not_computed(models, read):
    attn, original = models
    x = torch.randn(2, S, hy.SMALL.hidden)

    def step1(model, x):
        y = model(x, hy.step1_mask(T, N), torch.arange(S), S)
        if read == "slice":
            return y[:, T + 1:T + 1 + N]
        return y.masked_select(hy.image_mask(T, N)[..., None]).view(2, N, -1)

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        c = Compiled(lambda x: step1(attn, x))
        assert_same(c(x), step1(original, x))
    (site,) = c.sites
    assert "dead_tokens" in site.applied
    assert site.details["dead_tokens"]["queries"] == T + 2  # text+markers+timestep rows and the EOI row
    assert site.details["dead_tokens"]["keys"] == 1  # the EOI column: only the (dead) EOI row attended it
    assert attention_inputs(c) == (N, S - 1)
    assert site.savings["attention_flops"] > 0


def test_hunyuan_later_steps_timestep_row_and_eoi_column(models):
    attn, original = models
    with torch.no_grad():
        attn(torch.randn(2, S, hy.SMALL.hidden), hy.step1_mask(T, N), torch.arange(S), S)
        original.load_state_dict(attn.state_dict())
        original.k_cache.copy_(attn.k_cache)
        original.v_cache.copy_(attn.v_cache)
    x, mask, pos = torch.randn(2, 1 + N, hy.SMALL.hidden), hy.later_steps_mask(T, N), torch.arange(T, T + 1 + N)
    c = Compiled(lambda x, m: attn(x, m, pos, S)[:, 1:])
    with torch.no_grad():
        assert_same(c(x, mask), original(x, mask, pos, S)[:, 1:])
    (site,) = c.sites
    assert site.details["dead_tokens"]["queries"] == 1
    plan = site.details["mask"]  # the mask is an input: its EOI column is skipped by the run-time plan
    assert plan["analysis"] == "runtime" and plan["groups"] == [[0, N, 0, S - 1]]
    assert plan["keys_never_attended"] == 1


def test_rows_read_through_row_wise_ops_and_a_residual():
    w1, w2 = torch.randn(16, 16), torch.randn(16, 16)

    def block(q, k, v, x):
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 12, 16)
        h = x + F.linear(h, w1)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return F.silu(F.linear(h, w2))[:, -3:]

    q, k, v = (torch.randn(2, 4, 12, 4) for _ in range(3))
    x = torch.randn(2, 12, 16)
    c = Compiled(block)
    assert_same(c(q, k, v, x), block(q, k, v, x))
    assert c.sites[0].details["dead_tokens"]["queries"] == 9
    assert attention_inputs(c)[0] == 3


@pytest.mark.parametrize("trap", ["runtime_gather", "reduction_over_rows", "returned_whole"])
def test_rows_that_are_read_are_never_dropped(trap):
    def f(q, k, v, idx):
        out = F.scaled_dot_product_attention(q, k, v)
        if trap == "runtime_gather":
            return out[:, :, 2:][:, :, idx]  # a later gather with an index known only at run time
        if trap == "reduction_over_rows":
            return out[:, :, 4:].mean(2)
        return out, out[:, :, 1:]

    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    idx = torch.tensor([0, 5])
    c = Compiled(f)
    for a, e in zip(*(r if isinstance(r, tuple) else (r,) for r in (c(q, k, v, idx), f(q, k, v, idx)))):
        assert_same(a, e)
    dead = c.sites[0].details.get("dead_tokens", {"queries": 0})
    assert dead["queries"] == {"runtime_gather": 2, "reduction_over_rows": 4, "returned_whole": 0}[trap]


def test_verify_checks_the_rows_that_are_read():
    import attnfx

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)[:, :, 3:]

    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    opt = attnfx.optimize(f, compiler="eager", verify=True)
    assert_same(opt(q, k, v), f(q, k, v))
    assert attnfx.report(opt).verified and attnfx.report(opt).sites[0].details["live_rows"] == [3, 8]


def test_key_column_dead_in_one_batch_row_only_is_kept():
    def f(q, k, v):
        allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        allowed[0, :, :, 0] = False  # column 0 is dead for batch row 0 only
        allowed[:, :, :, 5] = False  # column 5 is dead for every row: dropped
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    c = Compiled(f)
    assert_same(c(q, k, v), f(q, k, v))
    assert c.sites[0].details["dead_tokens"]["keys"] == 1
    assert attention_inputs(c)[1] == 5


def test_a_mask_that_changes_between_calls():
    def f(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)[:, :, 2:]

    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    c = Compiled(f)
    for seed in range(3):
        m = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(seed)) > 0.4
        m[..., 0] = True
        assert_same(c(q, k, v, m), f(q, k, v, m))
    assert c.sites[0].details["dead_tokens"] == {"queries": 2, "keys": 0, "how": "only query rows [2, 6) are read"}


def test_hf_llama_only_the_last_position_is_read():
    """Generation reads only the last position's logits: the last layer computes one query row."""
    from hf_models import batch, build

    import attnfx

    model = build("llama", "sdpa")
    opt = attnfx.optimize(model, compiler="eager")
    ids, mask = batch(9)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, logits_to_keep=1).logits
        actual = opt(ids, attention_mask=mask, logits_to_keep=1).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    first, last = attnfx.report(opt).sites
    assert "dead_tokens" not in first.applied  # layer 0's rows feed layer 1's keys and values: all live
    assert last.details["dead_tokens"]["queries"] == 8
