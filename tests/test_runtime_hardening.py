"""The run-time caches under the conditions models are served and fine-tuned in: inference mode (tensors without
a version counter), weights edited in place (LoRA merges through ``.data``, ``load_state_dict``, optimizer
steps), long runs with fresh masks (memory bounded in bytes), many optimize/delete cycles, and concurrent
calls from threads. Every output is compared with the original model's."""

import gc
import random
import sys
import threading

import dit_loop as dit
import hf_models
import pytest
import torch
import torch.nn.functional as F
from helpers import repeat_kv
from torch import nn

import attnfx
from attnfx.runtime import cache, ops

TOL = {"rtol": 1e-5, "atol": 1e-5}
CONFIGS = {"default": {}, "runtime_op": {"specialize": False}, "cache_all": {"cache_invariants": "all"}}


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


# ------------------------------------------------------------------------------ weights edited in place


class TextCross(nn.Module):
    """Cross-attention to a text whose K/V projections read weights (the value invariant caching would hold)."""

    def __init__(self):
        super().__init__()
        self.q, self.tk, self.tv, self.o = nn.Linear(16, 16), nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 16)

    def forward(self, x, text):
        b = x.shape[0]
        q = self.q(x).view(b, -1, 2, 8).transpose(1, 2)
        k = self.tk(text).view(b, -1, 2, 8).transpose(1, 2)
        v = self.tv(text).view(b, -1, 2, 8).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def _weight(m):
    return m.tk.weight if isinstance(m, TextCross) else m.blocks[0].cross_k.weight


def _data_merge(m):  # PEFT's LoRA merge and unmerge: weight.data += delta, later -= delta
    _weight(m).data += 0.5
    yield
    _weight(m).data -= 0.5
    yield


def _data_assign(m):
    w = _weight(m)
    w.data = w.data * 1.5
    yield


def _load_state_dict(m):
    m.load_state_dict({k: v + 0.05 for k, v in m.state_dict().items()})
    yield


def _sgd_step(m, run):
    sgd = torch.optim.SGD(m.parameters(), lr=0.5)
    run().square().mean().backward()
    sgd.step()
    sgd.zero_grad(set_to_none=True)
    yield


def _no_grad_add(m):
    with torch.no_grad():
        _weight(m).add_(0.5)
    yield


EDITS = {"data_merge_unmerge": _data_merge, "data_assign": _data_assign, "load_state_dict": _load_state_dict,
         "sgd_step": _sgd_step, "no_grad_add": _no_grad_add}
THROUGH_DATA = {"data_merge_unmerge"}  # writes PyTorch does not count: the user clears the caches


def _edits(name, m, run):
    return EDITS[name](m, run) if name == "sgd_step" else EDITS[name](m)


@pytest.mark.parametrize("cache_invariants", [True, "all"])
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_dit_loop_after_weights_are_edited(edit, cache_invariants):
    m = dit_model()
    opt = attnfx.optimize(m, compiler="eager", cache_invariants=cache_invariants)
    latents, text, text_mask, img_ids = dit.inputs()
    with torch.no_grad():
        dit_steps(opt, m, latents, text, text_mask, img_ids, steps=6)  # invariants learned and cached
    for _ in _edits(edit, m, lambda: m(latents, torch.full((2,), 0.5), text, text_mask, img_ids)):
        if cache_invariants == "all" and edit in THROUGH_DATA:
            attnfx.clear_caches()
        with torch.no_grad():
            dit_steps(opt, m, latents, text, text_mask, img_ids, steps=3)


@pytest.mark.parametrize("cache_invariants", [True, "all"])
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_text_projection_after_weights_are_edited(edit, cache_invariants):
    torch.manual_seed(0)
    m = TextCross().eval()
    opt = attnfx.optimize(m, compiler="eager", cache_invariants=cache_invariants)
    x, text = torch.randn(2, 6, 16), torch.randn(2, 5, 8)

    def check(calls):
        with torch.no_grad():
            for _ in range(calls):
                torch.testing.assert_close(opt(x, text), m(x, text), **TOL)

    check(6)
    for _ in _edits(edit, m, lambda: m(x, text)):
        if cache_invariants == "all" and edit in THROUGH_DATA:
            attnfx.clear_caches()
        check(2)
    if cache_invariants == "all":
        assert any("linear" in g.what for g in attnfx.report(opt).cached)
    else:  # not cached, and the report says why
        kept = attnfx.report(opt).to_dict()["not_cached"]  # the projections of x and of the text
        assert kept and all("linear" in d["computes"] and "parameters" in d["why"] for d in kept)


def test_cache_invariants_option_values():
    for ok in (True, False, "all"):
        attnfx.Options.from_mapping({"cache_invariants": ok}, pattern_names=())
    for bad in ("yes", 1, None):
        with pytest.raises(attnfx.OptionsError, match="cache_invariants"):
            attnfx.Options.from_mapping({"cache_invariants": bad}, pattern_names=())


# ------------------------------------------------------------------------------ memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _per_head_mask(seed: int, kv_len: int = 16384) -> torch.Tensor:
    """A fresh bool mask whose heads differ (a general mask, the quickest to classify): 2 MiB by default."""
    mask = torch.ones(1, 2, 64, kv_len, dtype=torch.bool)
    mask[0, 1, seed % 64, : 1 + seed % 100] = False
    return mask


def _attn(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _qkv(kv_len):
    return torch.randn(1, 2, 64, 8), torch.randn(1, 2, kv_len, 8), torch.randn(1, 2, kv_len, 8)


def test_fresh_masks_through_the_run_time_op_keep_memory_bounded():
    """300 calls, each with a new 2 MiB mask: the plans held stay under their byte bound and the process's
    memory does not grow with the calls (a general mask run densely holds no copy of the mask)."""
    q, k, v = _qkv(16384)
    opt = attnfx.optimize(_attn, compiler="eager", specialize=False)
    with torch.no_grad():
        for i in range(300):
            mask = _per_head_mask(i)
            out = opt(q, k, v, mask)
            if i % 60 == 0:
                torch.testing.assert_close(out, _attn(q, k, v, mask), **TOL)
            if i == 20:
                start = _rss()
            del mask, out
        grown = _rss() - start
    assert ops.PLANS.nbytes <= ops.PLANS.max_bytes
    assert grown < 96 << 20, f"RSS grew by {grown >> 20} MiB over 280 calls with fresh 2 MiB masks"


def test_plans_holding_masks_are_bounded_in_bytes(monkeypatch):
    """With a kernel that keeps the classified mask (the reference kernel on a general mask) every plan holds
    256 KiB: the cache keeps the sum of what its plans hold under its byte bound."""
    monkeypatch.setattr(ops.PLANS, "max_bytes", 2 << 20)
    q, k, v = _qkv(2048)
    opt = attnfx.optimize(_attn, compiler="eager", specialize=False, kernel="reference")
    masks = []
    with torch.no_grad():
        for i in range(40):
            masks.append(_per_head_mask(i, 2048))  # kept alive: only the byte bound can drop their plans
            torch.testing.assert_close(opt(q, k, v, masks[-1]), _attn(q, k, v, masks[-1]), **TOL)
    held = [e.value for e in ops.PLANS._entries.values()]
    assert all(p.nbytes == 256 << 10 for p in held)
    assert sum(p.nbytes for p in held) == ops.PLANS.nbytes <= 2 << 20
    assert len(held) == 8 and ops.PLANS.stats.evictions == 32


def test_an_additive_bias_through_the_run_time_op():
    """A float mask with other values than 0 and -inf is a bias: its plan runs the dense SDPA and holds nothing."""
    q, k, v = _qkv(32)
    bias = torch.randn(1, 1, 64, 32)
    opt = attnfx.optimize(_attn, compiler="eager", specialize=False)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(opt(q, k, v, bias), _attn(q, k, v, bias), **TOL)
    assert ops.PLANS.nbytes == 0 and len(ops.PLANS) == 1


def test_a_value_larger_than_the_byte_bound_is_not_stored():
    c = cache.InputCache(max_bytes=100)
    x = torch.ones(4)
    for _ in range(2):
        c.get_or_compute("ns", [x], (), lambda: torch.zeros(1000), nbytes=lambda v: v.numel() * 4)
    assert len(c) == 0 and c.nbytes == 0 and c.stats.not_stored == 2


def test_optimize_and_delete_cycles_free_the_run_time_state():
    """The per-site state of the run-time op lives as long as the compiled graph: none is left after the
    models are deleted and Dynamo is reset."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x, mask):
            q = self.proj(x).view(2, 10, 2, 8).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool)
    mask[1, ..., 7:] = False
    gc.collect()
    start = len(ops.SITES)
    for i in range(100):
        model = Model()
        opt = attnfx.optimize(model, compiler="eager", specialize=False)
        with torch.no_grad():
            opt(x, mask)
        assert len(ops.SITES) > start
        del opt, model
        torch._dynamo.reset()
        if i % 10 == 9:
            gc.collect()
            assert len(ops.SITES) == start, f"cycle {i}: {len(ops.SITES) - start} site states left"


# ------------------------------------------------------------------------------ threads


CALLS = 1000  # per thread


def _four_masks(batch, length):
    masks = []
    for i in range(4):
        m = torch.zeros(batch, 1, length, length, dtype=torch.bool)
        for b, n in enumerate((length - i, length - 2 * i - 1)):
            m[b, :, :, :n] = True
        masks.append(m)
    return masks


@pytest.mark.parametrize("specialize", [False, True])
def test_concurrent_calls_give_every_call_its_own_answer(specialize):
    """8 threads call one optimized model with 4 masks of one shape: no call may get another mask's plan."""

    def attn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask)

    q, k, v = torch.randn(2, 4, 16, 16), torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    masks = _four_masks(2, 16)
    expected = [attn(q, k, v, m) for m in masks]
    opt = attnfx.optimize(attn, compiler="eager", specialize=specialize)
    with torch.no_grad():
        opt(q, k, v, masks[0])
    wrong, errors = [], []

    def work(seed):
        rng = random.Random(seed)
        try:
            with torch.no_grad():
                for _ in range(CALLS):
                    i = rng.randrange(4)
                    if not torch.allclose(opt(q, k, v, masks[i]), expected[i], **TOL):
                        wrong.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up in a short run
    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert not wrong, f"{len(wrong)} of {8 * CALLS} calls got another mask's output"


def test_concurrent_dit_loops_with_cached_invariants():
    """Threads denoising with different prompts through one optimized DiT, caching every invariant."""
    m = dit_model()
    opt = attnfx.optimize(m, compiler="eager", cache_invariants="all")
    latents, _, text_mask, img_ids = dit.inputs()
    texts = [torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        expected = [m(latents, t, text, text_mask, img_ids) for text in texts]
        opt(latents, t, texts[0], text_mask, img_ids)
    wrong, errors = [], []

    def work(seed):
        rng = random.Random(seed)
        try:
            with torch.no_grad():
                for _ in range(40):
                    i = rng.randrange(4) if seed % 2 else seed % 4  # some threads keep their prompt
                    if not torch.allclose(opt(latents, t, texts[i], text_mask, img_ids), expected[i], **TOL):
                        wrong.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert not wrong, f"{len(wrong)} of 240 calls differ from the original"
