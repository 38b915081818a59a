"""Never slower than torch.compile: no host work attnfx adds on the hot path, a cost model that keeps the dense
mask where a structure cannot pay, nothing decided per call inside a CUDA graph, and the metadata that keeps
static inputs (a static KV cache) static under CUDA graphs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import Compiled, HostSyncs, assert_same, repeat_kv

import attnfx
from attnfx.backends import cost
from attnfx.masks import Padding, RowGroups, Segment
from attnfx.runtime import ops

H, HKV, D = 8, 2, 16


def gqa_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, repeat_kv(k, H // HKV), repeat_kv(v, H // HKV), attn_mask=mask)


def qkv(batch, q_len, kv_len):
    return (torch.randn(batch, H, q_len, D), torch.randn(batch, HKV, kv_len, D), torch.randn(batch, HKV, kv_len, D))


def left_padded(batch, q_len, kv_len, pad):
    """A decoding step's mask: each row attends its real keys (left padding), a new tensor on every call."""
    mask = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool)
    for b, p in enumerate(pad):
        mask[b, ..., :p] = False
    return mask


@pytest.fixture
def gpu_rates(monkeypatch):
    """The cost model's CUDA rates for the CPU: its decisions run here as they would on the GPU."""
    monkeypatch.setitem(cost.RATES, "cpu", cost.RATES["cuda"])


def test_decoding_keeps_the_dense_mask_unread_and_still_drops_the_kv_copies(gpu_rates):
    c = Compiled(gqa_sdpa)
    q, k, v = qkv(2, 1, 40)
    for step in range(6):
        mask = left_padded(2, 1, 40, (3 + step, 0))  # a new mask each step
        with HostSyncs() as syncs:
            out = c(q, k, v, mask)
        if step >= 1:
            assert not syncs.calls  # nothing read on the host
        assert_same(out, gqa_sdpa(q, k, v, mask))
    (site,) = c.sites
    assert site.applied == ["gqa"] and "mask_structure" in site.patterns
    assert "cost model: 1 query row(s)" in site.reason and "unread" in site.reason
    assert not any("structured_attention" in op for op in c.ops())


def test_masks_new_on_every_call_stop_being_read():
    c = Compiled(gqa_sdpa, specialize=False)  # the run-time op: reads each new mask
    q, k, v = qkv(2, 24, 24)
    syncs_per_call = []
    for i in range(ops.STOP_ANALYSING_AFTER + 3):
        mask = left_padded(2, 24, 24, (i % 5, 1))
        with HostSyncs() as syncs:
            out = c(q, k, v, mask)
        assert_same(out, gqa_sdpa(q, k, v, mask))
        syncs_per_call.append(sum(syncs.calls.values()))
    assert all(n > 0 for n in syncs_per_call[:ops.STOP_ANALYSING_AFTER])
    assert syncs_per_call[ops.STOP_ANALYSING_AFTER:] == [0, 0, 0]
    mask = c.sites[0].details["mask"]
    assert mask["kind"] == "not read" and "new mask on each of" in mask["why"]


@pytest.mark.parametrize("specialize", [True, False])
def test_a_mask_used_again_and_again_costs_no_host_work(specialize):
    """A denoising loop passes the same mask every step: it is read once."""
    c = Compiled(gqa_sdpa, specialize=specialize)
    q, k, v = qkv(2, 24, 30)
    mask = left_padded(2, 24, 30, (4, 9))
    c(q, k, v, mask)
    for _ in range(3):
        with HostSyncs() as syncs:
            out = c(q, k, v, mask)
        assert not syncs.calls
        assert_same(out, gqa_sdpa(q, k, v, mask))


def test_cost_model_prefers_the_dense_kernel_where_a_structure_cannot_pay():
    # HunyuanImage3 at steps >= 2 (timestep row -> prefix, image rows -> everything but the EOI column)
    t, n = 1000, 4096
    hunyuan = RowGroups((Segment(0, 1, 0, t + 1), Segment(1, 1 + n, 0, t + 1 + n)))
    dense, structured = cost.compare(hunyuan, "sdpa.split", "cuda", 1, 32, 1 + n, t + 2 + n, 128, 2)
    assert cost.pays(dense, structured)
    # a tiny mask: three launches and a copy cost more than the few masked pairs they skip
    tiny = RowGroups((Segment(0, 1, 0, 9), Segment(1, 13, 0, 20)))
    dense, structured = cost.compare(tiny, "sdpa.split", "cuda", 2, 4, 13, 21, 16, 2)
    assert not cost.pays(dense, structured)
    # left-padded prefill: most pairs are real, yet causal halves them
    padded = Padding((2048, 1500, 1024, 700), "left", "top_left")
    dense, structured = cost.compare(padded, "sdpa.split", "cuda", 4, 32, 2048, 2048, 128, 2, 4)
    assert cost.pays(dense, structured)
    assert cost.compare(padded, "sdpa.split", "no-such-device", 4, 32, 2048, 2048, 128, 2) is None


def test_the_cost_model_decision_is_reported(gpu_rates):
    """A static mask whose structure cannot pay at this size: the dense mask stays, with the estimates."""

    def tiny(q, k, v):
        mask = torch.ones(13, 21, dtype=torch.bool)
        mask[0, 9:] = False
        mask[1:, 20] = False
        return gqa_sdpa(q, k, v, mask)

    c = Compiled(tiny)
    q, k, v = qkv(2, 13, 21)
    assert_same(c(q, k, v), tiny(q, k, v))
    (site,) = c.sites
    assert "mask_structure" not in site.applied and "cost model" in site.reason
    estimates = site.details["mask"]["cost"]
    assert estimates["dense"]["us"] < estimates["sdpa.split"]["us"] and estimates["sdpa.split"]["launches"] == 3


def test_under_cuda_graphs_nothing_is_decided_per_call_inside_the_graph():
    """mode="reduce-overhead": a mask passed in is specialized on behind a guard checked outside the graph;
    masks that fail the guard run a graph with the dense mask — never a plan chosen in Python at run time,
    which a CUDA graph replay would repeat for a different mask."""
    model = torch.nn.Identity()

    def attn(q, k, v, mask):
        return gqa_sdpa(model(q), k, v, mask)

    opt = attnfx.optimize(attn, compiler="eager", mode="reduce-overhead")
    q, k, v = qkv(2, 24, 24)
    masks = [left_padded(2, 24, 24, (3, 0)), left_padded(2, 24, 24, (3, 0)), left_padded(2, 24, 24, (0, 7)),
             left_padded(2, 24, 24, (3, 0)), left_padded(2, 24, 24, (5, 5))]
    with torch.no_grad():
        for mask in masks:
            assert_same(opt(q, k, v, mask), attn(q, k, v, mask))
    report = attnfx.report(opt)
    (site,) = report.sites
    assert site.details["mask"]["analysis"] == "specialized"
    assert site.details["specialized_on"][0]["failed"] >= 1


def test_graphs_handed_to_the_inner_compiler_keep_dynamo_metadata():
    """What Inductor reads to keep static inputs (parameters, a static KV cache marked with mark_static_address)
    static under CUDA graphs, on every graph attnfx hands over: rewritten, guarded general variant, and the
    remainders of invariant caching."""
    seen = []

    def inner(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    class Cached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k_cache", torch.zeros(2, HKV, 32, D))
            torch._dynamo.mark_static_address(self.k_cache)

        def forward(self, q, k, v, mask, pos):
            self.k_cache[:, :, pos] = k[:, :, 0]  # a static cache written in place
            rope = torch.arange(24.0).cos()  # an invariant: cut into a cached group
            return gqa_sdpa(q * rope[:, None], self.k_cache[:, :, :24], v, mask)

    model = Cached()
    opt = attnfx.optimize(model, compiler=inner)
    q, k, v = qkv(2, 24, 24)
    with torch.no_grad():
        opt(q, k, v, left_padded(2, 24, 24, (3, 0)), 5)
    assert len(seen) >= 2  # the specialized graph and the general one
    for gm in seen:
        assert "dynamo_compile_id" in gm.meta
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        dynamo = [n for n in placeholders if not n.name.startswith("attnfx_cached_")]
        assert all(getattr(n, "_dynamo_source", None) is not None for n in dynamo)
        assert any((n.meta.get("tensor_dict") or {}).get("_dynamo_static_input_type") for n in dynamo)
