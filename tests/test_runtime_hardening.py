"""The run-time caches under the conditions models are served in: inference mode (tensors without a version
counter). Every output is compared with the original model's."""

import dit_loop as dit
import hf_models
import pytest
import torch

import attnfx
from attnfx.runtime import cache

TOL = {"rtol": 1e-5, "atol": 1e-5}
CONFIGS = {"default": {}, "runtime_op": {"specialize": False}}


def dit_model():
    torch.manual_seed(0)
    return dit.DiT().eval()


def dit_steps(opt, m, latents, text, text_mask, img_ids, steps):
    """Euler steps on the original's trajectory: the optimized model's output is compared at every call."""
    x = latents
    for i in range(steps):
        t = torch.full((x.shape[0],), 1.0 - i / steps)
        expected = m(x, t, text, text_mask, img_ids)
        torch.testing.assert_close(opt(x, t, text, text_mask, img_ids), expected, **TOL, msg=f"step {i}")
        x = x - expected / steps


# ------------------------------------------------------------------------------ inference mode


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_hf_llama_under_inference_mode_with_a_mask_edited_in_place(config):
    m = hf_models.build("llama")
    opt = attnfx.optimize(m, compiler="eager", **CONFIGS[config])
    with torch.inference_mode():
        ids, mask = hf_models.batch(12, pad=3)
        ids, mask = ids.clone(), mask.clone()  # inference tensors: no version counter
        assert mask.is_inference()
        for _ in range(5):
            torch.testing.assert_close(opt(ids, attention_mask=mask).logits, m(ids, attention_mask=mask).logits,
                                       **TOL)
        for edit in (lambda: mask[0, :2].zero_(), lambda: mask[1].fill_(1), lambda: mask[1, :5].zero_()):
            edit()  # the same tensor, other contents: nothing in its identity says so
            for _ in range(2):
                torch.testing.assert_close(opt(ids, attention_mask=mask).logits,
                                           m(ids, attention_mask=mask).logits, **TOL)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_dit_loop_under_inference_mode_with_text_and_mask_edited_in_place(config):
    m = dit_model()
    opt = attnfx.optimize(m, compiler="eager", **CONFIGS[config])
    with torch.inference_mode():
        latents, text, text_mask, img_ids = (t.clone() for t in dit.inputs())
        assert text.is_inference() and text_mask.is_inference()
        dit_steps(opt, m, latents, text, text_mask, img_ids, steps=6)
        text.mul_(-2)  # a new prompt written into the same tensor
        dit_steps(opt, m, latents, text, text_mask, img_ids, steps=3)
        text_mask[0, 8:] = 0  # the first prompt gets shorter
        dit_steps(opt, m, latents, text, text_mask, img_ids, steps=3)
        img_ids[:, 0].add_(1)  # the RoPE positions move
        dit_steps(opt, m, latents, text, text_mask, img_ids, steps=3)


def test_an_inference_tensor_is_confirmed_by_its_copy():
    c = cache.InputCache()
    with torch.inference_mode():
        x = torch.arange(6.0)
    calls = []

    def compute():
        calls.append(1)
        return x.sum().item()

    assert c.get_or_compute("ns", [x], (), compute) == 15 and c.get_or_compute("ns", [x], (), compute) == 15
    assert len(calls) == 1 and c.nbytes == x.numel() * x.element_size()  # the copy is counted
    with torch.inference_mode():
        x[0] = 100
    assert c.get_or_compute("ns", [x], (), compute) == 115 and len(calls) == 2
    with torch.inference_mode():
        x[0] = float("nan")
    for _ in range(2):
        c.get_or_compute("ns", [x], (), compute)
    assert len(calls) == 3  # computed once, then confirmed: the copy is compared bit for bit (NaN is NaN)
    with torch.inference_mode():
        x[0], x[1] = 0.0, -0.0  # equal values, other bits
    c.get_or_compute("ns", [x], (), compute)
    assert len(calls) == 4


def test_inference_tensors_too_large_to_copy_are_not_stored(monkeypatch):
    monkeypatch.setattr(cache, "MAX_COPY_BYTES", 16)
    c = cache.InputCache()
    with torch.inference_mode():
        x = torch.ones(8)
    calls = []
    for _ in range(3):
        c.get_or_compute("ns", [x], (), lambda: calls.append(1))
    assert len(calls) == 3 and len(c) == 0 and c.nbytes == 0
