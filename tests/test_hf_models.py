"""Real models nobody here wrote: tiny HF transformers models, sdpa and eager attention, left padding,
two sequence lengths. Logits must equal the original's and every layer's site must be rewritten gqa."""

import pytest
import torch
from hf_models import ARCHS, SLIDING, batch, build, build_sliding, local_layers

import attnfx


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_equal_and_every_layer_rewritten(arch, attn):
    model = build(arch, attn)
    opt = attnfx.optimize(model, compiler="eager")
    with torch.no_grad():
        for length in (7, 11):
            ids, mask = batch(length)
            expected = model(ids, attention_mask=mask).logits
            actual = opt(ids, attention_mask=mask).logits
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    report = attnfx.report(opt)
    layers = model.config.num_hidden_layers
    assert report.graphs == 2 and len(report.sites) == 2 * layers  # lengths 7 and 11: two live graphs
    expected_patterns = (["gqa"] if attn == "sdpa" else ["manual_attention", "gqa"]) + ["mask_structure"]
    for i, site in enumerate(report.sites):
        assert site.module == f"model.layers.{i % layers}.self_attn"
        assert site.applied == expected_patterns, (site.patterns, site.reason)
        mask = site.details["mask"]
        # built from the attention_mask input: read from the first call (static shapes) behind a guard;
        # the second length compiles a dynamic-shape graph, where it is read at run time
        assert mask["analysis"] == ("specialized" if i < layers else "runtime"), mask
        assert mask["kind"] in ("padding", "row_groups", "general"), mask
        assert site.savings["kv_expansion_bytes"] > 0
        assert ":" in site.source and site.source.endswith(tuple("0123456789"))


def test_gemma2_soft_capping_is_refused_in_eager():
    model = build_gemma2("eager")
    opt = attnfx.optimize(model, compiler="eager")
    ids, mask = batch(9)
    with torch.no_grad():
        torch.testing.assert_close(opt(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=1e-4, atol=1e-4)
    sites = attnfx.report(opt).sites
    assert sites and all(not s.rewritten and "soft-capping" in s.reason for s in sites)


def build_gemma2(attn):
    import transformers

    cfg = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    attn_logit_softcapping=50.0, sliding_window=4)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(cfg).eval()


def test_training_step_gradients_match():
    model = build("llama", "sdpa")
    opt = attnfx.optimize(model, compiler="eager")
    model.train()
    ids, mask = batch(9)
    labels = ids.masked_fill(mask == 0, -100)

    def grads(m):
        model.zero_grad()
        m(ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    expected, actual = grads(model), grads(opt)
    assert attnfx.report(opt).sites[0].rewritten
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_verify_mode_passes_on_a_real_model():
    model = build("qwen2", "eager")
    opt = attnfx.optimize(model, compiler="eager", verify=True)
    ids, mask = batch(8)
    with torch.no_grad():
        opt(ids, attention_mask=mask)
    assert attnfx.report(opt).verified is True


def _run_padded(model, calls=((7, 2), (11, 2)), output="logits"):
    """The model and its optimized copy on left-padded batches, (length, padding) per call: outputs must be equal."""
    opt = attnfx.optimize(model, compiler="eager")
    with torch.no_grad():
        for length, pad in calls:
            ids, mask = batch(length, pad=pad)
            expected = getattr(model(ids, attention_mask=mask), output)
            torch.testing.assert_close(getattr(opt(ids, attention_mask=mask), output), expected, rtol=1e-4, atol=1e-4)
    return attnfx.report(opt)


def test_bloom_eager_attention_with_alibi_is_rewritten():
    """Bloom: ``alibi.baddbmm`` on (batch·heads, L, D), viewed as (batch, heads, L, S) for the padding mask and the
    float32 softmax, dropout, viewed back, ``bmm``: one SDPA call on the (batch, heads) split, ALiBi in its mask."""
    import transformers

    cfg = transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    report = _run_padded(transformers.BloomForCausalLM(cfg).eval())
    assert len(report.sites) == 4
    for site in report.sites:
        assert site.module.startswith("transformer.h.") and site.kind == "manual"
        assert site.rewritten and site.applied[0] == "manual_attention", site.reason
        assert site.details["mask"]["kind"] == "bias"  # ALiBi plus padding: SDPA's float mask, kept dense


FALCONS = {  # transformers 5.x Falcon variants (the 4.x in-place ``/=`` spelling: test_manual_attention)
    "multi_query": {},
    "new_decoder_architecture": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "alibi": {"alibi": True, "multi_query": False},
}


@pytest.mark.parametrize("variant", sorted(FALCONS))
def test_falcon_eager_attention_is_rewritten(variant):
    import transformers

    cfg = transformers.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    **FALCONS[variant])
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    report = _run_padded(transformers.FalconForCausalLM(cfg).eval())
    assert len(report.sites) == 4
    for site in report.sites:
        assert site.kind == "manual" and site.rewritten and site.applied[0] == "manual_attention", site.reason
        if variant != "alibi":
            assert "mask_structure" in site.applied and site.details["mask"]["kind"] == "padding"


def test_xlm_in_place_masked_fill_is_followed():
    """XLM writes the padding mask into the scores in place and reads them afterwards through ``scores.float()``:
    the rewrite must see the write (it used to be ignored: a wrong result)."""
    import transformers

    cfg = transformers.XLMConfig(vocab_size=128, emb_dim=64, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    report = _run_padded(transformers.XLMModel(cfg).eval(), output="last_hidden_state")
    assert len(report.sites) == 4
    assert all(site.rewritten and site.applied[0] == "manual_attention" for site in report.sites)


WINDOW = 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_sliding_window_layers_run_on_a_windowed_kernel(arch, attn):
    """Local layers: HF's sliding mask (i - window < j <= i, and the padding) is classified with its window and
    run on band blocks (sdpa.split, the windowed kernel on CPU); global layers: causal as before. First call
    without padding (the mask read at compile time), then with left padding (a new length: read at run time)."""
    model = build_sliding(arch, attn, WINDOW)
    if model is None:
        pytest.skip(f"this transformers has no {SLIDING[arch][1]}")
    report = _run_padded(model, calls=((7, 0), (11, 2)))
    local = local_layers(model)
    assert local and len(report.sites) == 4
    for i, site in enumerate(report.sites):
        layer, padded = i % 2, i >= 2
        assert site.module == f"model.layers.{layer}.self_attn" and site.rewritten, site.reason
        mask = site.details["mask"]
        assert mask["analysis"] == ("runtime" if padded else "specialized"), mask
        assert mask["kind"] == ("padding" if padded else "causal"), mask
        assert mask.get("causal", "top_left") == "top_left" and mask.get("align", "top_left") == "top_left"
        assert mask["kernel"] == "sdpa.split", mask
        if layer in local:
            assert mask["window"] == WINDOW and "sliding window of 4 keys" in mask["why"], mask
        else:
            assert "window" not in mask, mask
