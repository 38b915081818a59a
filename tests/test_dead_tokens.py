"""dead_tokens: query rows nobody reads and key columns nobody may attend are not computed — exact on
every row that is read; when liveness cannot be proven, nothing is dropped."""


import pytest
import torch
import torch.nn.functional as F
from helpers import Compiled, assert_same

from attnfx.fx.graph import op_name, sdpa_args

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


def rows_of(c, name):
    """The token-axis length (dim 1) of every ``name`` op's output in the compiled graphs, in graph order."""
    return [n.meta["example_value"].shape[1] for g in c.graphs for n in g.graph.nodes
            if n.op.startswith("call") and getattr(n.target, "__name__", n.target) == name]


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

    with torch.no_grad():  # masked_select stays in the graph: attnfx's backend turns on dynamic output shapes
        c = Compiled(lambda x: step1(attn, x))
        assert_same(c(x), step1(original, x))
    (site,) = c.sites
    assert "dead_tokens" in site.applied
    assert site.details["dead_tokens"]["queries"] == T + 2  # text+markers+timestep rows and the EOI row
    assert site.details["dead_tokens"]["keys"] == 1  # the EOI column: only the (dead) EOI row attended it
    assert attention_inputs(c) == (N, S - 1)
    assert site.savings["attention_flops"] > 0
    # the rows are not computed around the attention either: RoPE and the per-head norm of the queries
    # before it (the fused qkv projection also feeds the keys: computed whole), o_proj after it
    assert rows_of(c, "linear") == [S, N]
    assert site.details["ops_on_fewer_rows"]["before"] >= 10 and site.details["ops_on_fewer_rows"]["after"] >= 3
    hidden = hy.SMALL.hidden
    assert site.savings["projection_flops"] == 2 * hidden * 2 * (S - N) * hidden  # o_proj on T + 2 fewer rows


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
    assert plan["analysis"] == "specialized" and plan["groups"] == [[0, N, 0, S - 1]]
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
    graphs = []
    opt = attnfx.optimize(model, compiler=lambda gm, ex: graphs.append(gm) or gm.forward)
    ids, mask = batch(9)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, logits_to_keep=1).logits
        actual = opt(ids, attention_mask=mask, logits_to_keep=1).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    first, last = attnfx.report(opt).sites
    assert "dead_tokens" not in first.applied  # layer 0's rows feed layer 1's keys and values: all live
    assert last.details["dead_tokens"]["queries"] == 8
    # the last layer's q_proj, o_proj and MLP run on the one row; k_proj, v_proj on all 9 (they are read)
    linears = [n.meta["example_value"].shape[1] for n in graphs[0].graph.nodes if n.target is F.linear]
    assert linears[-8:] == [1, 9, 9, 1, 1, 1, 1, 1]  # q, k, v, o, gate, up, down, lm_head
    assert last.savings["projection_flops"] > 0


def test_dead_key_positions_are_not_projected():
    """Keys no query may attend (a compile-time mask): their K and V projections are skipped."""
    wq, wk, wv = (torch.randn(32, 32) for _ in range(3))

    def f(x):
        q, k, v = (F.linear(x, w).view(2, 10, 4, 8).transpose(1, 2) for w in (wq, wk, wv))
        allowed = torch.ones(10, 10, dtype=torch.bool)
        allowed[:, 7:] = False  # keys 7.. are never attended
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    x = torch.randn(2, 10, 32)
    c = Compiled(f)
    assert_same(c(x), f(x))
    assert c.sites[0].details["dead_tokens"]["keys"] == 3
    assert rows_of(c, "linear") == [10, 7, 7]
    assert c.sites[0].savings["projection_flops"] == 2 * 2 * 32 * 2 * 3 * 32


def test_a_value_read_elsewhere_is_computed_whole():
    w = torch.randn(16, 16)

    def f(x, k, v):
        h = F.linear(x, w)
        q = h.view(1, 6, 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v)[:, :, 4:], h.sum()  # h is also read whole

    x, k, v = torch.randn(1, 6, 16), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    c = Compiled(f)
    for a, e in zip(c(x, k, v), f(x, k, v)):
        assert_same(a, e)
    assert rows_of(c, "linear") == [6]
    assert c.sites[0].details["dead_tokens"]["queries"] == 4


def test_queries_that_are_a_piece_of_a_split_read_elsewhere():
    """q, k, v unbound from one fused projection: q's piece is narrowed as a view, the projection stays whole."""
    w = torch.randn(48, 16)

    def f(x):
        q, k, v = F.linear(x, w).view(1, 6, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v)[:, :, 4:]

    x = torch.randn(1, 6, 16)
    c = Compiled(f)
    assert_same(c(x), f(x))
    assert c.sites[0].details["dead_tokens"]["queries"] == 4 and rows_of(c, "linear") == [6]
    assert attention_inputs(c) == (2, 6)


def test_a_view_written_in_place_before_the_attention_is_not_moved():
    def f(x, k, v):
        h = x * 2
        q = h.view(1, 6, 2, 8).transpose(1, 2)  # a view of h ...
        h.add_(1)  # ... written before the attention reads it
        return F.scaled_dot_product_attention(q, k, v)[:, :, 4:]

    x, k, v = torch.randn(1, 6, 16), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    c = Compiled(f)
    assert_same(c(x, k, v), f(x, k, v))
    assert c.sites[0].details["dead_tokens"]["queries"] == 4


def test_users_the_rows_cannot_follow_get_the_full_size_back():
    def f(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v)
        z = out[:, :, 2:] + out[:, :, :6]  # two different row ranges meet: computed on padded rows
        return z[:, :, 4:]

    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    c = Compiled(f)
    assert_same(c(q, k, v), f(q, k, v))
    assert c.sites[0].details["live_rows"] == [4, 8]
    assert c.sites[0].details["ops_on_fewer_rows"]["after"] == 2  # the two slices
    assert [getattr(n.target, "__name__", "") for g in c.graphs for n in g.graph.nodes].count("pad") == 2


def test_gradients_through_narrowed_projections():
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 16)
    ref = torch.nn.Linear(16, 16)
    ref.load_state_dict(proj.state_dict())

    def f(lin, x, k, v):
        q = lin(x).view(1, 6, 2, 8).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 6, 16)
        return lin(out)[:, 2:4]

    x, k, v = torch.randn(1, 6, 16), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    c = Compiled(lambda x, k, v: f(proj, x, k, v))
    c(x, k, v).square().sum().backward()
    f(ref, x, k, v).square().sum().backward()
    assert c.sites[0].details["dead_tokens"]["queries"] == 4
    assert_same(proj.weight.grad, ref.weight.grad)
    assert_same(proj.bias.grad, ref.bias.grad)


@pytest.fixture
def dynamic_output_shapes():
    """attnfx's backend keeps masked_select in its graphs by itself: nothing to set."""
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops
    yield


def test_hunyuan_step1_image_mask_passed_in(models, dynamic_output_shapes):
    """The real model reads its outputs with an ``image_mask`` it is given: the graph is specialized on
    the rows the first mask reads, checked once per distinct mask tensor; a mask reading other rows runs
    the graph compiled without that specialization."""
    attn, original = models
    x = torch.randn(2, S, hy.SMALL.hidden)

    def step1(model, x, image_mask):
        y = model(x, hy.step1_mask(T, N), torch.arange(S), S)
        return y.masked_select(image_mask[..., None]).view(2, -1, y.shape[-1])

    image = hy.image_mask(T, N)
    wider = image.clone()
    wider[:, 3:5] = True  # also reads two text rows
    c = Compiled(lambda x, m: step1(attn, x, m))
    with torch.no_grad():
        for m in (image, image, wider, image):
            assert_same(c(x, m), step1(original, x, m))
        (site,) = c.sites
        assert site.details["dead_tokens"]["queries"] == T + 2
        assert rows_of(c, "linear")[:2] == [S, N]  # the specialized graph: o_proj on the image rows
        assert len(c.graphs) == 2 and rows_of(c, "linear")[2:] == [S, S]  # the general one, compiled alongside
        (check,) = site.details["specialized_on"]
        assert check["expects"]["rows"] == [T + 1, T + 1 + N] and "graph input m" in check["what"]
        assert (check["checked"], check["failed"]) == (2, 1)  # image once (then cached), wider once
        image[:, 0] = True  # written in place: checked again, and now outside
        assert_same(c(x, image), step1(original, x, image))
        assert (check["checked"], check["failed"]) == (3, 2)


@pytest.mark.parametrize("how", ["index_select", "bool_index", "long_index"])
def test_rows_picked_by_an_index_passed_in(how, dynamic_output_shapes):
    w = torch.randn(8, 8)

    def f(q, k, v, index):
        out = F.linear(F.scaled_dot_product_attention(q, k, v), w)
        if how == "index_select":
            return out.index_select(2, index)
        return out[:, :, index]

    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    first = {"index_select": torch.tensor([4, 6]), "bool_index": torch.arange(10) % 5 == 4,
             "long_index": torch.tensor([-6, 6, 4])}[how]
    other = {"index_select": torch.tensor([0, 9]), "bool_index": torch.arange(10) < 2,
             "long_index": torch.tensor([-1, 0, 1])}[how]  # same length: no recompilation
    c = Compiled(f)
    for index in (first, other, first):
        assert_same(c(q, k, v, index), f(q, k, v, index))
    (check,) = c.sites[0].details["specialized_on"]
    assert c.sites[0].details["live_rows"] == check["expects"]["rows"] == ([4, 10] if how == "bool_index" else [4, 7])
    assert (check["checked"], check["failed"]) == (2, 1)
    bad = {"index_select": torch.tensor([4, 10]), "bool_index": torch.ones(11, dtype=torch.bool),
           "long_index": torch.tensor([4, 10, 5])}[how]
    with pytest.raises((IndexError, RuntimeError)):
        f(q, k, v, bad)
    with pytest.raises((IndexError, RuntimeError)):  # out of range: raises like the original, never reads garbage
        c(q, k, v, bad)


def test_index_sets_that_change_every_call_stop_being_checked():
    def f(q, k, v, index):
        return F.scaled_dot_product_attention(q, k, v).index_select(2, index)

    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    c = Compiled(f)
    for i in range(8):  # a new index tensor every call, some reading outside the first one's rows
        index = torch.tensor([5 + i % 5])
        assert_same(c(q, k, v, index), f(q, k, v, index))
    (check,) = c.sites[0].details["specialized_on"]
    assert check["checked"] == 4 and "stopped" in check


@pytest.mark.inductor
def test_index_set_passed_in_through_inductor(dynamic_output_shapes):
    """End to end through Inductor: the rewritten masked_select's data-dependent size is bound like Dynamo's."""
    import attnfx

    w = torch.randn(8, 8)

    def f(q, k, v, keep):
        out = F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 12, 8), w)
        return out.masked_select(keep[None, :, None]).view(1, -1, 8)

    q, k, v = (torch.randn(1, 2, 12, 4) for _ in range(3))
    keep, other = torch.arange(12) >= 8, torch.arange(12) < 3
    opt = attnfx.optimize(f, compiler="inductor")
    for m in (keep, other, keep):
        assert_same(opt(q, k, v, m), f(q, k, v, m))
    (site,) = attnfx.report(opt).sites
    assert site.details["live_rows"] == [8, 12] and site.details["specialized_on"][0]["failed"] == 1


def test_diffusers_flux_last_single_block_text_rows():
    """A model nobody here wrote: FluxTransformer2DModel drops the text tokens after its last single-stream
    block, so that block's text rows are dead — its query projection, RoPE, MLP branch and output
    projection run on the image rows only."""
    from diffusers import FluxTransformer2DModel

    import attnfx

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(-1, 3)
    kw = dict(hidden_states=torch.randn(1, 16, 8), encoder_hidden_states=torch.randn(1, 6, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.full((1,), 0.5), img_ids=img_ids,
              txt_ids=torch.zeros(6, 3), guidance=torch.full((1,), 3.5))
    opt = attnfx.optimize(model, compiler="eager", verify=True)
    with torch.no_grad():
        assert_same(opt(**kw).sample, model(**kw).sample)
    double, single0, single1 = attnfx.report(opt).sites
    assert "dead_tokens" not in single0.applied  # its text rows feed the next block's keys
    assert single1.module == "single_transformer_blocks.1.attn"
    assert single1.details["dead_tokens"] == {"queries": 6, "keys": 0, "how": "only query rows [6, 22) are read"}
    dim, mlp = 32, 128
    # to_q, proj_mlp (its branch is concatenated with the attention output) and proj_out on 6 fewer rows
    assert single1.savings["projection_flops"] == 2 * 6 * (dim * dim + dim * mlp + (dim + mlp) * dim)


# name -> (what computes q's input from x, an op in it, that op's rows after the rewrite: 2 when narrowed)
UPSTREAM = {
    "centered_over_rows": (lambda x: x - x.mean(dim=1, keepdim=True), "sub", 2),  # the mean reads every row
    "cumsum_over_rows": (lambda x: x.cumsum(1), "cumsum", 6),
    "softmax_over_rows": (lambda x: x.softmax(1), "softmax", 6),
    "layer_norm": (lambda x: F.layer_norm(x, (16,)), "layer_norm", 2),
    "flip_rows": (lambda x: x.flip(1), "flip", 6),
    "chunk_rope": (lambda x: torch.cat([-x.chunk(2, -1)[1], x.chunk(2, -1)[0]], -1) * 0.5 + x, "cat", 2),
    "unbind_stack": (lambda x: torch.stack(x.reshape(2, 6, 8, 2).unbind(-1)[::-1], -1).flatten(2), "stack", 2),
}
# name -> (how the attention output is read, the query rows found dead)
DOWNSTREAM = {
    "softmax_over_rows": (lambda o: o.softmax(2)[:, :, 3:], 0),
    "mean_over_rows": (lambda o: o.mean(2, keepdim=True) + o[:, :, 3:4], 0),
    "rows_merged_with_heads": (lambda o: o.transpose(1, 2).reshape(2, 24, 4)[:, 6:], 0),
    "strided_rows": (lambda o: o[:, :, ::2], 0),
    "flip_then_slice": (lambda o: o.flip(2)[:, :, :2], 0),
    "cat_on_rows": (lambda o: torch.cat([o, o], 2)[:, :, 10:], 0),
    "slice_of_slice": (lambda o: o[:, :, 2:][:, :, 1:3], 4),
    "int_row": (lambda o: o[:, :, -2] * 2, 5),
    "narrow": (lambda o: F.gelu(o).narrow(2, 4, 2), 4),
}


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_upstream_ops_are_narrowed_only_when_row_wise(name):
    w = torch.randn(16, 16)

    fn, op, rows = UPSTREAM[name]

    def f(x, k, v):
        q = F.linear(fn(x), w).view(2, 6, 4, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v)[:, :, 4:]

    x, k, v = torch.randn(2, 6, 16), torch.randn(2, 4, 6, 4), torch.randn(2, 4, 6, 4)
    c = Compiled(f)
    assert_same(c(x, k, v), f(x, k, v))
    assert c.sites[0].details["dead_tokens"]["queries"] == 4
    assert rows_of(c, "linear") == [2] and set(rows_of(c, op)) == {rows}


@pytest.mark.parametrize("name", list(DOWNSTREAM))
def test_downstream_uses_keep_every_row_they_read(name):
    read, dead = DOWNSTREAM[name]

    def f(q, k, v):
        return read(F.scaled_dot_product_attention(q, k, v))

    q, k, v = (torch.randn(2, 4, 6, 4) for _ in range(3))
    c = Compiled(f)
    assert_same(c(q, k, v), f(q, k, v))
    assert c.sites[0].details.get("dead_tokens", {"queries": 0})["queries"] == dead


def test_an_index_set_computed_inside_the_graph_is_refused_with_the_reason():
    def f(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v)
        idx = out[0, 0, :, 0].argsort()[:2]  # which rows are read depends on the attention's own result
        return out[:, :, idx]

    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    c = Compiled(f)
    assert_same(c(q, k, v), f(q, k, v))
    (site,) = c.sites
    assert "dead_tokens" in site.patterns and "dead_tokens" not in site.applied
    assert "heavy compute" in site.reason
