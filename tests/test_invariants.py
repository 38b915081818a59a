"""Per-step invariant caching on a FLUX/Wan-like DiT loop: values computed once per distinct input,
outputs bit-identical to not caching, recomputed when the text changes or is edited in place."""


import pytest
import torch

import attnfx

import dit_loop as dit  # noqa: E402


def model():
    torch.manual_seed(0)
    return dit.DiT().eval()


def groups(opt):
    return {g.phase: g for g in attnfx.report(opt).cached}, attnfx.report(opt).cached


def test_twenty_steps_bit_identical_and_each_invariant_computed_once():
    m = model()
    cached = attnfx.optimize(m, compiler="eager", cache_invariants="all")
    uncached = attnfx.optimize(m, compiler="eager", cache_invariants=False)
    with torch.no_grad():
        a = dit.denoise(cached, *dit.inputs(), steps=20)
        b = dit.denoise(uncached, *dit.inputs(), steps=20)
        e = dit.denoise(m, *dit.inputs(), steps=20)
    assert torch.equal(a, b)  # caching changes nothing
    torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)  # and the rewrites stay within rounding
    found = attnfx.report(cached).cached
    assert len(found) == 3
    assert all(g.computed == 1 for g in found)
    what = " | ".join(g.what for g in found)
    assert "cos" in what and "sin" in what and "linear" in what and "tensor" in what
    learned = [g for g in found if g.phase == "learned at run time"]
    assert sum(g.what == "linear" for g in learned) == 1 and learned[0].hits + learned[1].hits >= 30
    assert attnfx.report(cached).summary()["cached_bytes"] > 0


def test_recomputed_when_the_text_changes_or_is_edited_in_place():
    m = model()
    opt = attnfx.optimize(m, compiler="eager", cache_invariants="all")  # the text projections read weights
    latents, text, text_mask, img_ids = dit.inputs()
    with torch.no_grad():
        dit.denoise(opt, latents, text, text_mask, img_ids, steps=6)
        projections = next(g for g in attnfx.report(opt).cached if g.what == "linear")
        assert projections.computed == 1
        other = torch.randn_like(text)  # a new prompt: a new tensor
        torch.testing.assert_close(dit.denoise(opt, latents, other, text_mask, img_ids, steps=3),
                                   dit.denoise(m, latents, other, text_mask, img_ids, steps=3), rtol=1e-5, atol=1e-5)
        assert projections.computed == 2
        other.mul_(2)  # the same tensor, edited in place: its _version moved
        torch.testing.assert_close(dit.denoise(opt, latents, other, text_mask, img_ids, steps=3),
                                   dit.denoise(m, latents, other, text_mask, img_ids, steps=3), rtol=1e-5, atol=1e-5)
        assert projections.computed == 3


def test_cfg_branches_called_one_by_one():
    m = model()
    opt = attnfx.optimize(m, compiler="eager", cache_invariants="all")
    latents, text, text_mask, img_ids = dit.inputs()
    empty = torch.zeros_like(text)
    with torch.no_grad():
        x = y = latents
        for i in range(6):
            t = torch.full((2,), 1.0 - i / 6)
            x = x - opt(x, t, text, text_mask, img_ids) / 6 - 0.1 * opt(x, t, empty, text_mask, img_ids) / 6
            y = y - m(y, t, text, text_mask, img_ids) / 6 - 0.1 * m(y, t, empty, text_mask, img_ids) / 6
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    projections = next(g for g in attnfx.report(opt).cached if g.what == "linear")
    assert projections.computed == 2  # once per prompt


def test_an_input_taken_as_stable_that_starts_changing():
    m = model()
    opt = attnfx.optimize(m, compiler="eager", cache_invariants="all")
    latents, text, text_mask, img_ids = dit.inputs()
    with torch.no_grad():
        dit.denoise(opt, latents, text, text_mask, img_ids, steps=5)
        for i in range(6):  # a new text every call from now on: correct, and soon no longer stored
            other = torch.randn_like(text)
            t = torch.full((2,), 0.5)
            torch.testing.assert_close(opt(latents, t, other, text_mask, img_ids), m(latents, t, other, text_mask, img_ids),
                                       rtol=1e-5, atol=1e-5)
    projections = next(g for g in attnfx.report(opt).cached if g.what == "linear")
    assert projections.varying


def test_dynamic_shapes_keep_the_compile_time_groups():
    m = model()
    opt = attnfx.optimize(m, compiler="eager", dynamic=True)
    with torch.no_grad():
        for size in (6, 8):
            latents, text, text_mask, img_ids = dit.inputs(size=size)
            torch.testing.assert_close(dit.denoise(opt, latents, text, text_mask, img_ids, steps=3),
                                       dit.denoise(m, latents, text, text_mask, img_ids, steps=3), rtol=1e-5, atol=1e-5)
    rep = attnfx.report(opt)
    assert rep.graphs == 1 and rep.cached and all(g.phase == "compile time" for g in rep.cached)


def test_training_computes_instead_of_caching():
    m = model().train()
    opt = attnfx.optimize(m, compiler="eager", cache_invariants="all")
    latents, text, text_mask, img_ids = dit.inputs()
    t = torch.full((2,), 0.5)
    for _ in range(5):
        m.zero_grad()
        opt(latents, t, text, text_mask, img_ids).square().mean().backward()
        actual = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        m(latents, t, text, text_mask, img_ids).square().mean().backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(actual[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # values reading trainable parameters are recomputed every call (their autograd graph is per call);
    # values of ids and constants alone may be reused
    trainable = [g for g in attnfx.report(opt).cached if g.what == "linear"]
    assert all(g.hits == 0 for g in trainable)


def test_values_reading_parameters_are_computed_every_call_by_default():
    """Weights edited through .data (a LoRA merge) cannot be seen by the keys: by default what reads an
    nn.Parameter is not cached, and the report says so; the parameter-free part before it still is."""
    m = model()
    cached = attnfx.optimize(m, compiler="eager")
    uncached = attnfx.optimize(m, compiler="eager", cache_invariants=False)
    with torch.no_grad():
        a = dit.denoise(cached, *dit.inputs(), steps=8)
        b = dit.denoise(uncached, *dit.inputs(), steps=8)
    assert torch.equal(a, b)
    rep = attnfx.report(cached)
    assert rep.cached and all("linear" not in g.what for g in rep.cached)
    assert all(g.computed == 1 for g in rep.cached)
    kept = rep.to_dict()["not_cached"]
    assert {d["found"] for d in kept} == {"compile time", "learned at run time"}
    assert all("linear" in d["computes"] and "parameters" in d["why"] for d in kept)
    assert "not cached, computed every call" in str(rep)


def test_switched_off():
    m = model()
    opt = attnfx.optimize(m, compiler="eager", cache_invariants=False)
    with torch.no_grad():
        dit.denoise(opt, *dit.inputs(), steps=3)
    assert attnfx.report(opt).cached == []


@pytest.mark.inductor
def test_inductor_takes_the_cached_values_as_inputs():
    m = model()
    opt = attnfx.optimize(m, cache_invariants="all")
    with torch.no_grad():
        a = dit.denoise(opt, *dit.inputs(), steps=8)
        e = dit.denoise(m, *dit.inputs(), steps=8)
    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    assert len(attnfx.report(opt).cached) == 3


def test_diffusers_flux_transformer_loop():
    """A model nobody here wrote: diffusers' FluxTransformer2DModel rebuilds RoPE from txt/img ids, the context
    embedding and the guidance embedding at every call."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    txt = torch.randn(1, 6, 32)
    pooled = torch.randn(1, 32)
    txt_ids = torch.zeros(6, 3)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(-1, 3)
    guidance = torch.full((1,), 3.5)
    cached = attnfx.optimize(model, compiler="eager", cache_invariants="all")
    uncached = attnfx.optimize(model, compiler="eager", cache_invariants=False)

    def loop(m):
        x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(1))
        for i in range(6):
            t = torch.full((1,), 1.0 - i / 6)
            x = x - m(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                      img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample / 6
        return x

    with torch.no_grad():
        a, b, e = loop(cached), loop(uncached), loop(model)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    found = attnfx.report(cached).cached
    assert found and any("linear" in g.what for g in found) and any("cos" in g.what or "sin" in g.what for g in found)
    assert all(g.computed == 1 for g in found)


def test_an_input_written_in_place_is_never_cached():
    """HunyuanImage3's static KV cache is written with index_copy_: nothing reading it may be cached."""
    import hunyuan_image3 as hy

    attn, original = hy.make(hy.SMALL), hy.make(hy.SMALL)
    opt = attnfx.optimize(attn, compiler="eager")
    with torch.no_grad():
        expected = hy.denoise(original, 20, 64, steps=5)
        actual = hy.denoise(opt, 20, 64, steps=5)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    analysis_inputs = [p for g in attnfx.report(opt).cached for p in g.prefix.graph.nodes if p.op == "placeholder"]
    assert not any("cache" in p.name for p in analysis_inputs)
