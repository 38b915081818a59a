"""The HunyuanImage3 and Bagel reproductions in examples/, optimized: outputs equal the original's and the
report says what was found (the K/V expansion, the mask structures) at every step."""


import pytest
import torch

import attnfx

import bagel  # noqa: E402
import hunyuan_image3 as hy  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hunyuan_image3_denoising_loop(dtype):
    original, model = hy.make(hy.SMALL, dtype=dtype), hy.make(hy.SMALL, dtype=dtype)
    opt = attnfx.optimize(model, compiler="eager", verify=True, rtol=3e-2, atol=3e-2)
    with torch.no_grad():
        expected = hy.denoise(original, 20, 64, steps=4, dtype=dtype)
        actual = hy.denoise(opt, 20, 64, steps=4, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    rep = attnfx.report(opt)
    assert rep.verified and rep.graphs == 2
    step1, later = rep.sites
    for site in (step1, later):
        assert site.applied == ["gqa", "mask_structure"]
        assert site.details["n_rep"] == 4 and site.details["kv_heads"] == 2
    assert step1.details["mask"]["kind"] == "row_groups"
    assert step1.details["mask"]["groups"] == [[0, 21, 0, 21, "causal"], [21, 85, 0, 85], [85, 86, 0, 86]]
    assert later.details["mask"]["groups"] == [[0, 1, 0, 21], [1, 65, 0, 85]]  # timestep->prefix, image->all but EOI
    assert later.details["mask"]["kernel"] == "sdpa.split"


def test_hunyuan_mask_is_analysed_once_for_every_later_step():
    from attnfx.runtime.ops import PLANS

    model = hy.make(hy.SMALL)
    opt = attnfx.optimize(model, compiler="eager")
    with torch.no_grad():
        hy.denoise(opt, 20, 64, steps=2)
        before = PLANS.stats.misses
        hy.denoise(opt, 20, 64, steps=6)  # new step-1 mask tensor: one miss; the later-steps mask: one miss
    assert PLANS.stats.misses - before == 2


@pytest.mark.parametrize("kernel", [None, "varlen.reference"])
def test_bagel_packed_cfg_branches(kernel):
    model, args, kwargs = bagel.make()
    opt = attnfx.optimize(model, compiler="eager", verify=True, **({"kernel": kernel} if kernel else {}))
    with torch.no_grad():
        torch.testing.assert_close(opt(*args, **kwargs), model(*args, **kwargs), rtol=1e-5, atol=1e-5)
    (site,) = attnfx.report(opt).sites
    assert site.applied == ["gqa", "mask_structure"]
    mask = site.details["mask"]
    assert mask["analysis"] == "static" and mask["kind"] == "block_diagonal"
    assert mask["q_seqlens"] == [24, 24, 24] and mask["kv_seqlens"] == [36, 24, 31]
    assert mask["kernel"] == (kernel or "sdpa.split")


def test_bagel_branches_must_not_see_each_other():
    """The bug of naive batched ports: without the block-diagonal mask, branches mix. attnfx keeps them apart."""
    model, (x, pk, pv, lens, prefix), _ = bagel.make()
    opt = attnfx.optimize(model, compiler="eager")
    with torch.no_grad():
        together = opt(x, pk, pv, lens, prefix)
        alone = [model(x[i * 24:(i + 1) * 24], pk[sum(prefix[:i]):sum(prefix[:i + 1])],
                       pv[sum(prefix[:i]):sum(prefix[:i + 1])], (24,), (prefix[i],)) for i in range(3)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("static_cache", [False, True])
def test_generate_example(static_cache):
    import generate

    actual, expected, report = generate.generate(static_cache=static_cache, new_tokens=4)
    assert torch.equal(actual, expected)
    assert report.sites and all(s.rewritten for s in report.sites)
    assert all(s.applied[0] == "gqa" for s in report.sites)
