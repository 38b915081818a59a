"""Ascend NPU targets against a CPU emulator of the fused infer attention op's contract (no NPU here):
native and FP8 outputs vs references, the exact arguments passed, step/layer selectors, clear errors."""

import sys

import pytest
import torch
import torch.nn.functional as F

import attnfx
import npu_emulator as emu
from attnfx.runtime import ops

import dit_loop as dit  # noqa: E402


@pytest.fixture
def npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", emu.module())
    emu.CALLS.clear()
    attnfx.reset_steps()
    yield emu.CALLS


def test_hf_llama_native(npu):
    from hf_models import batch, build

    model = build("llama", "sdpa").to(torch.bfloat16)
    opt = attnfx.optimize(model, compiler="eager", npu=True)
    ids, mask = batch(9)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits.float()
        actual = opt(ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(actual, expected, rtol=3e-2, atol=3e-2)
    assert len(npu) == 2  # one call per layer
    for call in npu:
        assert call["op"] == "v2" and call["input_layout"] == "BNSD"
        assert call["num_query_heads"] == 4 and call["num_key_value_heads"] == 2  # GQA: K/V not expanded
        assert tuple(call["key"].shape)[1] == 2
        assert call["softmax_scale"] == pytest.approx(16 ** -0.5)  # passed: the op's default would be 1.0
        assert call["atten_mask"].dtype == torch.bool and call["sparse_mode"] == 0 and call["inner_precise"] == 2
        assert call["query_quant_mode"] == 0
    # NPU polarity: True = not attended. Row 1 is left-padded by 2: its first keys are masked.
    m = npu[0]["atten_mask"]
    assert m[1, 0, -1, :2].all() and not m[1, 0, -1, 2:].any()
    site = attnfx.report(opt).sites[0]
    assert site.applied == ["gqa", "npu_attention"]
    assert site.details["npu"]["op"] == "npu_fused_infer_attention_score_v2" and not site.details["npu"]["quantized"]


def fp32_dit_reference(model, args):
    ref = dit.DiT()
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        return ref.eval()(*(a.float() if torch.is_floating_point(a) else a for a in args))


def test_wan_like_dit_fp8(npu):
    torch.manual_seed(0)
    model = dit.DiT().to(torch.bfloat16).eval()
    latents, text, text_mask, img_ids = dit.inputs(size=16)  # 256 image + 4 register tokens, 12 text tokens
    args = (latents.bfloat16(), torch.full((2,), 0.5, dtype=torch.bfloat16), text.bfloat16(), text_mask, img_ids)
    opt = attnfx.optimize(model, compiler="eager", npu_fp8=True)
    with torch.no_grad():
        actual = opt(*args).float()
    expected = fp32_dit_reference(model, args)
    rel = (actual - expected).norm() / expected.norm()
    assert rel < 0.05, f"FP8 relative error {rel:.3f}"
    assert len(npu) == 4  # self- and cross-attention of 2 blocks
    for call in npu:
        assert (call["query_quant_mode"], call["key_quant_mode"], call["value_quant_mode"]) == (7, 7, 7)
        q, k = call["query"], call["key"]
        assert q.dtype == k.dtype == call["value"].dtype == torch.float8_e4m3fn
        b, n, sq, _ = q.shape
        assert sq % 128 == 0 and k.shape[2] % 256 == 0
        assert tuple(call["dequant_scale_query"].shape) == (b, n, sq // 128)
        assert tuple(call["dequant_scale_key"].shape) == (b, k.shape[1], k.shape[2] // 256)
        assert call["dequant_scale_value"].dtype == torch.float32
        assert call["softmax_scale"] == pytest.approx(16 ** -0.5)
        assert call["actual_seq_kvlen"] == [260] * 2 or call["actual_seq_kvlen"] == [12] * 2  # padding excluded
    assert all(s.details["npu"]["quantized"] for s in attnfx.report(opt).sites)


def test_fp8_is_close_to_native_and_the_rotation_is_exact(npu):
    from attnfx.backends import npu as npu_backend

    rot = npu_backend.hadamard(64, "cpu", torch.float32)
    torch.testing.assert_close(rot @ rot.T, torch.eye(64), rtol=0, atol=1e-6)  # orthogonal: Q·Kᵀ unchanged
    q, k, v = (torch.randn(2, 8, 300, 64, dtype=torch.bfloat16) for _ in range(3))
    native, _ = npu_backend.attention(q, k[:, :2], v[:, :2])
    quant, call = npu_backend.attention(q, k[:, :2], v[:, :2], fp8=True)
    assert call.quantized and quant.shape == native.shape and quant.dtype == torch.bfloat16
    assert (quant.float() - native.float()).norm() / native.float().norm() < 0.05


def test_selectors_choose_steps_and_layers(npu):
    torch.manual_seed(0)
    model = dit.DiT().to(torch.bfloat16).eval()
    opt = attnfx.optimize(model, compiler="eager", npu_fp8=True, skip_steps="0-1", skip_layers="1")
    latents, text, text_mask, img_ids = dit.inputs()
    with torch.no_grad():
        for i in range(4):
            opt(latents.bfloat16(), torch.full((2,), 1 - i / 4, dtype=torch.bfloat16), text.bfloat16(), text_mask, img_ids)
        with attnfx.denoise_step(1):  # explicit: a skipped step
            opt(latents.bfloat16(), torch.full((2,), 0.1, dtype=torch.bfloat16), text.bfloat16(), text_mask, img_ids)
    by_layer = {rt.layer: rt.calls for rt in ops.SITES.values()
                if isinstance(rt, ops.NpuSite) and rt.record in attnfx.report(opt).sites}
    assert sorted(by_layer) == [0, 1, 2, 3]
    for layer, calls in by_layer.items():
        assert [s for s, _ in calls] == [0, 1, 2, 3, 1]  # the last calls of the site (a bounded history)
        assert [q for _, q in calls] == [False, False, layer != 1, layer != 1, False]
    modes = [c["query_quant_mode"] for c in npu]
    assert modes.count(7) == 2 * 3  # steps 2 and 3, layers 0, 2, 3
    attnfx.reset_steps()
    with torch.no_grad():
        opt(latents.bfloat16(), torch.full((2,), 1.0, dtype=torch.bfloat16), text.bfloat16(), text_mask, img_ids)
    assert by_layer[0][-1] == (0, False)  # a new request starts at step 0 again


@pytest.mark.parametrize("bad,part", [("1-x", "'1-x'"), ("3-1", "'3-1'"), ("0,,2", "''"), ("-1", "'-1'"),
                                      ("a", "'a'")])
def test_bad_selector_strings(npu, bad, part):
    with pytest.raises(attnfx.OptionsError, match=f"skip_layers '{bad}': {part} is not"):
        attnfx.optimize(torch.nn.Linear(2, 2), npu_fp8=True, skip_layers=bad)


def test_no_torch_npu_is_a_clear_error_and_nothing_npu_is_imported_unasked(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with pytest.raises(attnfx.OptionsError, match="NPU target was requested but torch_npu is not importable"):
        attnfx.optimize(torch.nn.Linear(2, 2), npu=True)
    opt = attnfx.optimize(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), compiler="eager")
    q = torch.randn(1, 2, 4, 8)
    opt(q, q, q)
    assert "torch_npu" not in sys.modules


def test_legacy_op_when_v2_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", emu.module(v2=False))
    emu.CALLS.clear()
    q, k, v = torch.randn(1, 4, 6, 16, dtype=torch.bfloat16), *(torch.randn(1, 2, 6, 16, dtype=torch.bfloat16) for _ in range(2))

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)

    opt = attnfx.optimize(attn, compiler="eager", npu=True)
    torch.testing.assert_close(opt(q, k, v).float(), attn(q, k, v).float(), rtol=2e-2, atol=2e-2)
    (call,) = emu.CALLS
    assert call["op"] == "v1" and call["scale"] == pytest.approx(0.25) and call["num_heads"] == 4
    assert call["sparse_mode"] == 2 and call["num_key_value_heads"] == 2  # is_causal: top-left, optimized mask
    with pytest.raises(attnfx.OptionsError, match="unknown attnfx option"):
        attnfx.optimize(attn, npu_int8=True)


@pytest.mark.parametrize("case", ["causal", "key_padding", "packed"])
def test_mask_structures_reach_the_op_without_a_dense_mask(npu, case):
    """The mask is analysed once: causal -> sparse_mode 2, key padding -> actual_seq_kvlen, packed block-diagonal
    sequences -> TND with cumulative lengths."""
    n, hkv, d = 4, 2, 16
    if case == "packed":
        q = torch.randn(1, n, 9, d, dtype=torch.bfloat16)
        k, v = (torch.randn(1, hkv, 12, d, dtype=torch.bfloat16) for _ in range(2))
        mask = torch.block_diag(torch.ones(3, 5), torch.ones(4, 4), torch.ones(2, 3)).bool()
    else:
        q, k, v = (torch.randn(2, h, 7, d, dtype=torch.bfloat16) for h in (n, hkv, hkv))
        mask = torch.ones(7, 7, dtype=torch.bool).tril() if case == "causal" else torch.arange(7) < torch.tensor([[7], [4]])
        mask = mask if case == "causal" else mask[:, None, None, :]

    def attn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=m)

    opt = attnfx.optimize(attn, compiler="eager", npu=True)
    for _ in range(2):
        torch.testing.assert_close(opt(q, k, v, mask).float(), attn(q, k, v, mask).float(), rtol=2e-2, atol=2e-2)
    call = npu[-1]
    if case == "causal":
        assert call["sparse_mode"] == 2 and tuple(call["atten_mask"].shape) == (2048, 2048)
    elif case == "key_padding":
        assert call["atten_mask"] is None and call["actual_seq_kvlen"] == [7, 4]
    else:
        assert call["input_layout"] == "TND" and call["actual_seq_qlen"] == [3, 7, 9]
        assert call["actual_seq_kvlen"] == [5, 9, 12] and call["atten_mask"] is None
    detail = attnfx.report(opt).sites[0].details["npu"]
    assert detail["mask"]["kind"] == {"causal": "causal", "key_padding": "padding", "packed": "block_diagonal"}[case]
