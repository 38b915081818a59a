"""FP8 attention on CUDA (``fp8=True``) against a CPU emulator of the cuDNN frontend's ``sdpa_fp8`` contract
(tests/cudnn_emulator.py; no GPU here): the plumbing — argument layouts, scales, the rotation's and the centring's
exactness, step/layer selectors, refusals, the error bound, the report — and a DiT denoising loop close to bf16."""

import dataclasses
import math
import sys

import cudnn_emulator as emu
import dit_loop as dit
import pytest
import torch
import torch.nn.functional as F

import attnfx
from attnfx.backends import capabilities, cudnn_fp8
from attnfx.backends.hadamard import hadamard
from attnfx.runtime import ops


@pytest.fixture
def cudnn(monkeypatch):
    """The emulator as ``cudnn``, and the kernel's capability entry extended to the CPU (where it runs)."""
    monkeypatch.setitem(sys.modules, "cudnn", emu.module())
    entry = capabilities.BY_NAME[cudnn_fp8.KERNEL]
    monkeypatch.setitem(capabilities.BY_NAME, cudnn_fp8.KERNEL, dataclasses.replace(entry, devices=("cuda", "cpu")))
    monkeypatch.setattr(emu, "OPTIONS", emu.Options())
    cudnn_fp8.clear()
    emu.CALLS.clear()
    emu.BUILDS.clear()
    attnfx.reset_steps()
    yield emu
    cudnn_fp8.clear()


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def qkv(b=1, h=4, s=300, d=64, hkv=None, seed=0, biased=True):
    """bf16 inputs like real activations: per-channel means in K and V (what linear layers with biases give)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, hkv or h, s, d, generator=g)
    v = torch.randn(b, hkv or h, s, d, generator=g)
    if biased:
        k = k + torch.randn(b, hkv or h, 1, d, generator=g)
        v = v + 2 * torch.randn(b, hkv or h, 1, d, generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def sites(opt):
    return attnfx.report(opt).sites


def fp8_states(opt):
    records = sites(opt)
    return {rt.layer: rt for rt in ops.SITES.values()
            if isinstance(rt, ops.Fp8Site) and any(rt.record is r for r in records)}


# ------------------------------------------------------------------------------------------------- exactness


def test_the_rotation_leaves_q_k_products_unchanged():
    for d in (16, 64, 128):
        r = hadamard(d, "cpu", torch.float64, normalized=False)
        torch.testing.assert_close(r @ r.T, d * torch.eye(d, dtype=torch.float64), rtol=0, atol=0)
        q, k = torch.randn(3, 7, d, dtype=torch.float64), torch.randn(3, 9, d, dtype=torch.float64)
        torch.testing.assert_close((q @ r) @ (k @ r).transpose(-1, -2) / d, q @ k.transpose(-1, -2))
        # ±1 entries: exact in bfloat16 (1/√d would not be)
        assert torch.equal(hadamard(d, "cpu", torch.bfloat16, normalized=False).double(), r)
    n = hadamard(64, "cpu", torch.float32)  # the NPU path's normalized rotation: orthogonal
    torch.testing.assert_close(n @ n.T, torch.eye(64), rtol=0, atol=1e-6)


def test_centring_v_is_exact_because_softmax_rows_sum_to_one():
    q, k, v = (torch.randn(2, 3, 50, 16, dtype=torch.float64) for _ in range(3))
    v = v + 5
    vc, mean = cudnn_fp8.centre(v)
    p = torch.softmax(q @ k.transpose(-1, -2) / 4, -1)
    torch.testing.assert_close(p @ vc.double() + mean.double(), p @ v)
    assert mean.shape == (2, 3, 1, 16) and vc.float().mean(-2).abs().max() < 1e-5


def test_quantize_uses_one_scale_amax_over_448_and_never_overflows():
    x = torch.randn(2, 3, 40, 16) * 7
    x8, descale, scale = cudnn_fp8.quantize(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == () and descale.dtype == torch.float32
    torch.testing.assert_close(descale, x.abs().amax() / 448)
    torch.testing.assert_close(scale * descale, torch.tensor(1.0))
    assert x8.float().abs().max() == 448  # the largest value lands on E4M3's largest finite value
    assert rel(x8.float() * descale, x) < 0.04  # E4M3 rounding (3 mantissa bits)
    z8, zd, _ = cudnn_fp8.quantize(torch.zeros(4, 4))  # all zero: a tiny scale, no NaN
    assert torch.isfinite(zd) and not z8.float().any()


# ------------------------------------------------------------------------------------------------- the kernel call


def test_arguments_scales_and_layouts_passed_to_the_kernel(cudnn):
    q, k, v = qkv()

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    opt = attnfx.optimize(attn, compiler="eager", fp8=True)
    out = opt(q, k, v)
    ref = attn(q.float(), k.float(), v.float())
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert rel(out, ref) < 0.02, rel(out, ref)  # centred V: well below FP8's ~6% on i.i.d. inputs
    (call,) = cudnn.CALLS
    for n in ("q", "k", "v"):
        assert call[n].dtype == torch.float8_e4m3fn and tuple(call[n].shape) == tuple(q.shape)
    rot = hadamard(64, "cpu", torch.bfloat16, normalized=False)
    torch.testing.assert_close(call["descale_q"], float((q @ rot).float().abs().amax() / 448), rtol=1e-6, atol=0)
    torch.testing.assert_close(call["descale_k"], float((k @ rot).float().abs().amax() / 448), rtol=1e-6, atol=0)
    vc = v.float() - v.float().mean(-2, keepdim=True)
    torch.testing.assert_close(call["descale_v"], float(vc.abs().amax() / 448), rtol=1e-6, atol=0)
    assert call["scale_o"] == pytest.approx(1 / call["descale_v"], rel=1e-6)  # |O - mean| <= max|V - mean|
    assert call["scale_s"] * call["descale_s"] == 1 and call["scale_s"] == 256
    assert call["attn_scale"] == pytest.approx(64 ** -0.5 / 64)  # (Q·R)(K·R)ᵀ = 64·Q·Kᵀ
    assert not call["causal"] and not call["padding"] and call["saturated"] == 0
    # V was centred before quantizing: the dequantized V has (almost) no mean over the tokens
    assert (call["v"].float() * call["descale_v"]).mean(-2).abs().max() < 0.05
    (site,) = sites(opt)
    assert site.applied == ["fp8_attention"] and site.target == "attnfx::fp8_attention"
    d = site.details["fp8"]
    assert d["calls"] == {"fp8": 1} and d["last"] == {"step": 0, "precision": "fp8", "why": None}
    assert d["error"]["rel_l2"] < 0.02 and d["error"]["bound"] == 0.05 and d["error"]["step"] == 0
    assert d["kernel"]["name"] == "cudnn.sdpa_fp8" and d["kernel"]["cudnn"] == 91900
    assert d["kernel"]["padded_to"] is None and d["kernel"]["binding"] == "tensor"
    assert "per tensor" in d["scales"]


def test_the_graph_quantizes_in_plain_ops_and_the_op_is_kept_out_of_cuda_graphs(cudnn):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    q, k, v = qkv(s=64)
    opt = attnfx.optimize(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), compiler=keep, fp8=True)
    opt(q, k, v)
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "get_attr")]
    assert targets.count(torch.matmul) == 2 and targets.count(cudnn_fp8.quantize) == 3
    assert cudnn_fp8.centre in targets and cudnn_fp8.dequantize in targets and torch.where in targets
    assert targets.count(torch.ops.attnfx.fp8_attention.default) == 1
    (rot,) = [n for n in gm.graph.nodes if n.op == "get_attr"]  # the rotation: a constant of the graph
    assert torch.equal(getattr(gm, rot.target), hadamard(64, "cpu", torch.bfloat16, normalized=False))
    if hasattr(torch.Tag, "cudagraph_unsafe"):
        assert torch.Tag.cudagraph_unsafe in torch.ops.attnfx.fp8_attention.default.tags


@pytest.mark.parametrize("case", ["causal", "gqa", "repeat_kv"])
def test_causal_and_gqa(cudnn, case):
    q, k, v = qkv(h=8, hkv=2, s=200)

    def attn(q, k, v):
        if case == "causal":
            return F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                  is_causal=True)
        if case == "gqa":
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))

    opt = attnfx.optimize(attn, compiler="eager", fp8=True)
    out = opt(q, k, v)
    ref = attn(q.float(), k.float(), v.float())
    assert rel(out, ref) < 0.03, rel(out, ref)
    (call,) = cudnn.CALLS
    assert call["causal"] == (case == "causal")
    assert call["k"].shape[1] == call["v"].shape[1] == 2  # gqa removed the expansion: K/V heads read once
    (site,) = sites(opt)
    assert site.applied == ["gqa", "fp8_attention"] if case != "gqa" else site.applied == ["fp8_attention"]
    assert site.details["fp8"]["n_rep"] == 4 and site.details["fp8"]["causal"] == (case == "causal")


def test_a_shape_the_kernel_refuses_runs_natively_and_says_why(cudnn):
    cudnn.OPTIONS.gqa = False
    q, k, v = qkv(h=8, hkv=2, s=64)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    opt = attnfx.optimize(attn, compiler="eager", fp8=True)
    for _ in range(2):
        torch.testing.assert_close(opt(q, k, v), attn(q, k, v), rtol=0, atol=0)  # the native kernel, exactly
    assert not cudnn.CALLS and not cudnn.BUILDS  # refused at build: never executed (and built once)
    d = sites(opt)[0].details["fp8"]
    assert d["calls"] == {"native (kernel unavailable)": 2}
    assert d["last"]["why"].startswith("kernel unavailable: cudnnGraphNotSupportedError: 8 query heads for 2")


def test_a_length_refused_unpadded_is_padded_to_128(cudnn):
    cudnn.OPTIONS.unpadded_multiple = 128
    q, k, v = qkv(s=300)
    opt = attnfx.optimize(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), compiler="eager", fp8=True)
    out = opt(q, k, v)
    assert rel(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) < 0.02
    (call,) = cudnn.CALLS
    assert call["padding"] and call["q"].shape[2] == 384
    assert sites(opt)[0].details["fp8"]["kernel"]["padded_to"] == 384


def test_a_kernel_that_fails_to_run_leaves_the_site_native_without_crashing(cudnn, monkeypatch):
    def broken(self, pack, workspace, handle=None):
        raise RuntimeError("CUDNN_STATUS_EXECUTION_FAILED")

    monkeypatch.setattr(cudnn.pygraph, "execute", broken)
    q, k, v = qkv(s=64)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    opt = attnfx.optimize(attn, compiler="eager", fp8=True)
    for _ in range(2):
        torch.testing.assert_close(opt(q, k, v), attn(q, k, v), rtol=0, atol=0)
    d = sites(opt)[0].details["fp8"]
    assert d["disabled"] == "kernel failed: RuntimeError: CUDNN_STATUS_EXECUTION_FAILED"
    assert d["calls"] == {"native (kernel failed)": 2}
    assert cudnn_fp8.BINDING[0].startswith("pointers (tensors refused: RuntimeError")  # it tried raw pointers too


# ------------------------------------------------------------------------------------------------- refusals, bound


def test_cross_attention_masks_and_gradients_stay_native(cudnn):
    q, k, v = qkv(s=64)
    text_k, text_v = k[:, :, :12], v[:, :, :12]
    mask = torch.rand(1, 1, 64, 64) > 0.2

    def attn(q, k, v, tk, tv, m):
        a = F.scaled_dot_product_attention(q, tk, tv)  # cross-attention: 12 keys for 64 queries
        b = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return a + b

    opt = attnfx.optimize(attn, compiler="eager", fp8=True)
    torch.testing.assert_close(opt(q, k, v, text_k, text_v, mask), attn(q, k, v, text_k, text_v, mask))
    cross, masked = sites(opt)
    assert not cross.rewritten and "fp8_attention: cross-attention (12 keys for 64 queries)" in cross.reason
    assert cross.details["fp8"] == {"precision": "native", "why": "cross-attention (12 keys for 64 queries): "
                                                                  "native precision"}
    assert "fp8_attention" not in masked.applied and "an attention mask" in masked.reason
    assert not cudnn.CALLS
    qg = q.float().requires_grad_()
    opt = attnfx.optimize(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), compiler="eager", fp8=True)
    opt(qg, k.float(), v.float()).sum().backward()
    assert "inference-only" in sites(opt)[0].reason and qg.grad is not None


def test_a_self_attention_with_dead_query_rows_is_not_cross_attention(cudnn):
    q, k, v = qkv(s=300)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)[:, :, 4:]  # register tokens' rows are never read

    opt = attnfx.optimize(attn, compiler="eager", fp8=True)
    out = opt(q, k, v)
    assert rel(out, attn(q.float(), k.float(), v.float())) < 0.02
    (site,) = sites(opt)
    assert site.applied == ["dead_tokens", "fp8_attention"]
    (call,) = cudnn.CALLS
    assert call["q"].shape[2] == 296 and call["k"].shape[2] == 300


def test_above_the_error_bound_a_site_stays_native(cudnn):
    q, k, v = qkv(biased=False)  # i.i.d. inputs: FP8's worst case (~5%)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    opt = attnfx.optimize(attn, compiler="eager", fp8=True, fp8_max_error=0.01)
    for _ in range(3):
        torch.testing.assert_close(opt(q, k, v), attn(q, k, v), rtol=0, atol=0)  # native from the first call on
    assert len(cudnn.CALLS) == 1  # the first call ran the kernel once, to measure
    d = sites(opt)[0].details["fp8"]
    assert 0.01 < d["error"]["rel_l2"] < 0.1
    assert d["disabled"].startswith("error bound: relative L2") and "> fp8_max_error 0.01" in d["disabled"]
    assert d["calls"] == {"native (error bound)": 3}


# ------------------------------------------------------------------------------------------------- selectors, loop


def bf16_args(latents, t, text, text_mask, img_ids):
    return latents.bfloat16(), t.bfloat16(), text.bfloat16(), text_mask, img_ids


def test_selectors_choose_steps_and_layers(cudnn):
    torch.manual_seed(0)
    model = dit.DiT().to(torch.bfloat16).eval()
    opt = attnfx.optimize(model, compiler="eager", fp8=True, skip_steps="0-1", skip_layers="1")
    latents, text, text_mask, img_ids = dit.inputs()
    with torch.no_grad():
        for i in range(4):
            opt(*bf16_args(latents, torch.full((2,), 1 - i / 4), text, text_mask, img_ids))
        with attnfx.denoise_step(1):  # explicit: a skipped step
            opt(*bf16_args(latents, torch.full((2,), 0.1), text, text_mask, img_ids))
    states = fp8_states(opt)
    assert sorted(states) == [0, 1]  # the two self-attention sites (the cross-attention sites are refused)
    assert [s for s, _ in states[0].calls] == [0, 1, 2, 3, 1]
    assert [p for _, p in states[0].calls] == ["native", "native", "fp8", "fp8", "native"]
    assert [p for _, p in states[1].calls] == ["native"] * 5  # layer 1 skipped
    assert len(cudnn.CALLS) == 2  # layer 0 at steps 2 and 3
    by_layer = {s.details["fp8"]["layer"]: s.details["fp8"] for s in sites(opt) if "fp8_attention" in s.applied}
    assert by_layer[0]["calls"] == {"native (step skipped)": 3, "fp8": 2}
    assert by_layer[1]["calls"] == {"native (layer skipped)": 5}
    assert by_layer[1]["precision"] == "native (layer skipped)"
    assert by_layer[0]["skip_steps"] == "0-1" and by_layer[0]["skip_layers"] == "1"
    attnfx.reset_steps()
    with torch.no_grad():
        opt(*bf16_args(latents, torch.full((2,), 1.0), text, text_mask, img_ids))
    assert states[0].calls[-1] == (0, "native")  # a new request starts at step 0 again


def denoise(model, latents, text, text_mask, img_ids, steps=20):
    x = latents.bfloat16()
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((x.shape[0],), 1.0 - i / steps, dtype=torch.bfloat16)
            x = x - model(x, t, text.bfloat16(), text_mask, img_ids) / steps
    return x.float()


def test_dit_denoising_loop_in_fp8_is_close_to_bf16_and_reported(cudnn):
    torch.manual_seed(0)
    model = dit.DiT().to(torch.bfloat16).eval()
    inputs = dit.inputs(size=16)  # 256 latent + 4 register tokens; 12 text tokens
    expected = denoise(attnfx.optimize(model, compiler="eager"), *inputs)
    attnfx.reset_steps()
    opt = attnfx.optimize(model, compiler="eager", fp8=True, skip_steps="0-1")
    actual = denoise(opt, *inputs)
    cos = F.cosine_similarity(actual.flatten(), expected.flatten(), dim=0)
    assert cos > 0.999 and rel(actual, expected) < 0.03, (float(cos), rel(actual, expected))
    assert len(cudnn.CALLS) == 2 * 18  # two self-attention layers, steps 2..19
    report = attnfx.report(opt)
    self_attn = [s for s in report.sites if "fp8_attention" in s.applied]
    cross = [s for s in report.sites if "fp8_attention" not in s.applied]
    assert len(self_attn) == len(cross) == 2
    for s in self_attn:
        d = s.details["fp8"]
        assert d["calls"] == {"native (step skipped)": 2, "fp8": 18}
        assert d["error"]["step"] == 2 and d["error"]["rel_l2"] < d["bound"]
        assert d["last"] == {"step": 19, "precision": "fp8", "why": None}
    for s in cross:
        assert s.details["fp8"]["why"].startswith("cross-attention (12 keys for ")
    data = report.to_dict()  # JSON-serialisable, with the per-site precision
    assert data["sites"][0]["fp8"]["calls"] == {"native (step skipped)": 2, "fp8": 18}
    assert "attnfx::fp8_attention" in str(report)


def test_verify_measures_the_fp8_path_on_the_first_call(cudnn):
    torch.manual_seed(0)
    model = dit.DiT().to(torch.bfloat16).eval()
    opt = attnfx.optimize(model, compiler="eager", fp8=True, skip_steps="0-1", verify=True)
    latents, text, text_mask, img_ids = dit.inputs()
    with torch.no_grad():
        for i in range(3):
            opt(*bf16_args(latents, torch.full((2,), 1 - i / 3), text, text_mask, img_ids))
    report = attnfx.report(opt)
    assert report.verified
    for s in (s for s in report.sites if "fp8_attention" in s.applied):
        d = s.details["fp8"]
        assert d["error"]["step"] == 0  # measured by the verification run, although step 0 is skipped
        assert 0 < d["verify_rel_l2"] < 0.05
    states = fp8_states(opt)
    # the verification run did not count as a step: the real calls were steps 0, 1, 2
    assert [c for c in states[0].calls] == [(0, "fp8"), (0, "native"), (1, "native"), (2, "fp8")]


def test_verify_fails_when_the_outputs_exceed_the_bound(cudnn):
    """Each site within the bound, the graph's output not: V's large mean dominates the site's output (a small
    relative error there), the graph then subtracts it (the same absolute error, now relatively large)."""
    q, k, v = (t.float() for t in qkv(biased=False))
    v = v + 20 * torch.randn(1, 4, 1, 64)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v) - v.mean(-2, keepdim=True)

    opt = attnfx.optimize(attn, compiler="eager", fp8=True, verify=True, fp8_max_error=0.02)
    with pytest.raises(attnfx.VerificationError, match="graph output 0 differs from the original by relative L2"):
        opt(q, k, v)
    d = sites(opt)[0].details["fp8"]
    assert d["error"]["rel_l2"] < 0.002 and d["verify_rel_l2"] < 0.002


# ------------------------------------------------------------------------------------------------- options


def test_without_the_frontend_fp8_is_a_clear_error_and_nothing_is_imported_unasked(monkeypatch):
    monkeypatch.setitem(sys.modules, "cudnn", None)  # import cudnn raises ImportError
    with pytest.raises(attnfx.OptionsError, match="fp8=True needs the cuDNN frontend's FP8 attention but the cuDNN "
                                                  "frontend .nvidia-cudnn-frontend. is not importable"):
        attnfx.optimize(torch.nn.Linear(2, 2), fp8=True)
    monkeypatch.delitem(sys.modules, "cudnn")
    opt = attnfx.optimize(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), compiler="eager")
    q = torch.randn(1, 2, 4, 8)
    opt(q, q, q)
    assert "cudnn" not in sys.modules


def test_options(cudnn):
    attnfx.optimize(torch.nn.Linear(2, 2), fp8=True, skip_steps="0-1", skip_layers="0,3")  # fp8 takes selectors
    with pytest.raises(attnfx.OptionsError, match="need npu_fp8=True or fp8=True"):
        attnfx.optimize(torch.nn.Linear(2, 2), skip_steps="0-1")
    with pytest.raises(attnfx.OptionsError, match="different targets"):
        attnfx.optimize(torch.nn.Linear(2, 2), fp8=True, npu=True)
    for bad in (0, -0.1, "0.05", True, None):
        with pytest.raises(attnfx.OptionsError, match="fp8_max_error must be a positive number"):
            attnfx.optimize(torch.nn.Linear(2, 2), fp8=True, fp8_max_error=bad)
    with pytest.raises(attnfx.OptionsError, match="skip_steps '1-x'"):
        attnfx.optimize(torch.nn.Linear(2, 2), fp8=True, skip_steps="1-x")
    assert "cudnn.sdpa_fp8" not in capabilities.structured_kernels()  # not a kernel for mask structures


def test_sites_off_cuda_are_refused_with_the_capability_tables_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "cudnn", emu.module())  # the frontend imports, but the site is on the CPU
    q = torch.randn(1, 2, 8, 16)
    opt = attnfx.optimize(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), compiler="eager", fp8=True)
    opt(q, q, q)
    assert sites(opt)[0].reason == "fp8_attention: cudnn.sdpa_fp8 does not run on cpu"


@pytest.mark.inductor
def test_through_inductor(cudnn):
    q, k, v = qkv(s=256)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    opt = attnfx.optimize(attn, fp8=True, skip_steps="1")
    ref = attn(q.float(), k.float(), v.float())
    outs = [opt(q, k, v) for _ in range(3)]
    assert rel(outs[0], ref) < 0.02 and rel(outs[2], ref) < 0.02
    torch.testing.assert_close(outs[1], attn(q, k, v), rtol=0, atol=0)  # step 1: the native kernel
    assert len(cudnn.CALLS) == 2 and all(c["causal"] for c in cudnn.CALLS)
    assert sites(opt)[0].details["fp8"]["calls"] == {"fp8": 2, "native (step skipped)": 1}
    assert math.isfinite(sites(opt)[0].details["fp8"]["error"]["rel_l2"])
