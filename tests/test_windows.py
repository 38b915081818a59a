"""Sliding-window masks on windowed kernels: the window's semantics (HF's, FlashAttention's), the structures,
every kernel that takes a window against the reference (the CUDA-only adapters through a stand-in that
computes what FlashAttention computes for the arguments passed), the kernel choice, and through the compiler."""

import inspect
from dataclasses import replace

import pytest
import torch
import torch.nn.attention.varlen as torch_varlen
import torch.nn.functional as F
from helpers import Compiled, assert_same, repeat_kv
from transformers import masking_utils

from attnfx.backends import capabilities, execute, flex, reference, varlen
from attnfx.masks import Causal, Padding, Segment, classify

H, HKV, D = 4, 2, 16
CPU, CUDA = torch.device("cpu"), torch.device("cuda")

WINDOWED = {  # name: (structure, batch, q_len, kv_len)
    "top_left": (Causal("top_left", 3), 2, 9, 9),
    "top_left_more_queries": (Causal("top_left", 3), 2, 9, 6),
    "bottom_right_on_a_cache": (Causal("bottom_right", 4), 2, 5, 11),
    "bottom_right_more_queries": (Causal("bottom_right", 4), 1, 11, 7),
    "window_of_one": (Causal("top_left", 1), 1, 6, 6),
    "wide_window": (Causal("top_left", 40), 2, 37, 37),
    "long": (Causal("top_left", 5), 2, 70, 70),
    "left_padding": (Padding((9, 6, 2), "left", "top_left", 3), 3, 9, 9),
    "right_padding": (Padding((9, 6, 2), "right", "top_left", 3), 3, 9, 9),
    "left_padding_long": (Padding((40, 33), "left", "top_left", 6), 2, 40, 40),
}


def qkv(batch, q_len, kv_len, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(q_len * 100 + kv_len)
    make = lambda h, n: torch.randn(batch, h, n, D, dtype=dtype, generator=g).requires_grad_(requires_grad)  # noqa: E731
    return make(H, q_len), make(HKV, kv_len), make(HKV, kv_len)


def hf_sliding(q_len, kv_len, window, batch=1):
    """The mask HF transformers builds for a sliding-window layer (masking_utils, queries at the end of the cache)."""
    return masking_utils.sdpa_mask(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=kv_len - q_len,
                                   mask_function=masking_utils.sliding_window_causal_mask_function(window),
                                   allow_is_causal_skip=False)


# --------------------------------------------------------------------------------------- the semantics


@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (4, 9), (1, 12)])
@pytest.mark.parametrize("window", [1, 2, 3, 5, 20])
def test_hf_sliding_window_is_the_structure_and_flash_attentions_window(q_len, kv_len, window):
    """HF's ``sliding_window=w`` keeps key j for query i when i - w < j <= i: ``Causal(window=w)`` (bottom-right on
    a cache), classified back bit for bit, and FlashAttention's ``window_size=(w - 1, 0)`` (its window counts
    the keys before the diagonal)."""
    mask = hf_sliding(q_len, kv_len, window)
    structure = Causal("bottom_right", window)
    assert torch.equal(structure.materialize(q_len, kv_len), mask)
    found = classify(mask, 1, H, q_len, kv_len).structure
    assert torch.equal(found.materialize(q_len, kv_len), mask)
    if window < kv_len:
        assert found.describe()["window"] == window
    q, k, v = qkv(1, q_len, kv_len)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    cu_q, cu_k = torch.tensor([0, q_len]), torch.tensor([0, kv_len])
    flash = reference.varlen(*packed, cu_q, cu_k, q_len, kv_len, causal=True, scale=0.3, window_size=(window - 1, 0))
    assert_same(flash.transpose(0, 1)[None], reference.attention(q, k, v, mask, scale=0.3))


def test_reference_encodes_flash_attention_window_semantics():
    """FlashAttention: query r of a sequence with lq queries and n keys sees keys in [r + n - lq - left,
    r + n - lq + right] (inclusive; -1 unbounded; causal: right = 0); with seqused_k, n is the used keys."""
    lq, lk = 4, 10
    q, k, v = qkv(1, lq, lk)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    cu_q, cu_k = torch.tensor([0, lq]), torch.tensor([0, lk])
    for (left, right), causal, used in [((2, 0), False, None), ((2, 1), False, None), ((-1, 1), False, None),
                                        ((3, 5), True, None), ((1, 0), True, 7), ((-1, -1), False, 6)]:
        n = lk if used is None else used
        allowed = torch.zeros(lq, lk, dtype=torch.bool)
        for r in range(lq):
            diag = r + n - lq
            hi = diag + (0 if causal else right if right >= 0 else lk)
            lo = diag - left if left >= 0 else 0
            allowed[r, max(lo, 0):min(hi, n - 1) + 1] = True
        out = reference.varlen(*packed, cu_q, cu_k, lq, lk, causal=causal, scale=0.3, window_size=(left, right),
                               seqused_k=None if used is None else torch.tensor([used]))
        assert_same(out.transpose(0, 1)[None], reference.attention(q, k, v, allowed, scale=0.3))


# --------------------------------------------------------------------------------------- the structures


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_windowed_structures_classify_and_split_exactly(name):
    structure, batch, q_len, kv_len = WINDOWED[name]
    dense = structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len)
    found = classify(dense, batch, H, q_len, kv_len).structure
    assert torch.equal(found.materialize(q_len, kv_len).expand_as(dense), dense)
    cuts = not torch.equal(replace(structure, window=None).materialize(q_len, kv_len).expand_as(dense), dense)
    assert found.describe().get("window") == (structure.window if cuts else None)  # a window cutting nothing: none
    blocks, rows = execute.band_blocks(structure.segments(q_len, kv_len))
    assert rows == 0 or len(blocks) <= execute.MAX_SPLIT or rows >= q_len
    again = torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool)
    for s in blocks:
        for b in (range(batch) if s.batch is None else (s.batch,)):
            assert not again[b, 0, s.q0:s.q1, s.k0:s.k1][s.band()].any()  # blocks never overlap
            again[b, 0] |= s.allowed(q_len, kv_len)
    assert torch.equal(again, dense)


def test_segment_rows_split_into_bands():
    s = Segment(0, 10, 0, 10, causal=True, window=3)
    blocks = s.split_rows(3)
    assert [(b.q0, b.q1, b.k0, b.k1) for b in blocks] == [(0, 3, 0, 3), (3, 6, 1, 6), (6, 9, 4, 9), (9, 10, 7, 10)]
    assert not blocks[0].windowed() and all(b.windowed() for b in blocks[1:3])  # the first block: plain causal
    with pytest.raises(ValueError):
        Segment(0, 2, 0, 2, window=2)  # a window is causal


# ----------------------------------------------------------------------------- kernels against the reference


@pytest.mark.parametrize("kernel", ["sdpa.split", "varlen.reference", "reference", "flex"])
@pytest.mark.parametrize("fill", ["zero", "nan", "mean_v"])
@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_windowed_kernels_compute_the_masked_attention(name, fill, kernel):
    structure, batch, q_len, kv_len = WINDOWED[name]
    if kernel == "flex" and fill != "zero":
        pytest.skip("FlexAttention gives 0 on rows with no allowed key: used only where the original does")
    dtype = torch.float32 if kernel == "flex" else torch.float64
    q, k, v = qkv(batch, q_len, kv_len, dtype)
    allowed = structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len)
    expected = reference.attention(q, k, v, allowed, scale=0.3, fill=fill)
    if kernel == "flex":
        actual = flex.attention(q, k, v, flex.block_mask_for(structure, q_len, kv_len, q.device), scale=0.3,
                                enable_gqa=True)
    else:
        actual = execute.run(structure, kernel, q, k, v, scale=0.3, enable_gqa=True, fill=fill)
    assert_same(actual, expected)


class FlashStandIn:
    """CUDA-only varlen kernels, on CPU: each takes the arguments its real API takes and computes what
    FlashAttention computes for them (reference.varlen), recording the calls."""

    def __init__(self):
        self.calls = []

    def flash_attn_varlen_func(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                               causal=False, window_size=(-1, -1)):
        self.calls.append({"causal": causal, "window_size": tuple(window_size)})
        return reference.varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=softmax_scale,
                                window_size=tuple(window_size))

    def varlen_attn(self, q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                    enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        # torch/nn/attention/varlen.py: is_causal only for (-1, 0); the window goes to the flash kernel as is
        self.calls.append({"window_size": tuple(window_size), "enable_gqa": enable_gqa})
        assert enable_gqa or k.shape[1] == q.shape[1]
        return reference.varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=tuple(window_size) == (-1, 0), scale=scale,
                                seqused_k=seqused_k, window_size=tuple(window_size))

    def aten_flash(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale=None,
                   window_size_left=None, window_size_right=None, seqused_k=None, **kw):
        # flash_api.cpp mha_varlen_fwd: a window as wide as the keys is none; causal forces right = 0
        self.calls.append({"is_causal": is_causal, "window_size": (window_size_left, window_size_right)})
        left = -1 if window_size_left is None or window_size_left >= max_k else window_size_left
        right = -1 if window_size_right is None or window_size_right >= max_k else window_size_right
        out = reference.varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=is_causal, scale=scale, seqused_k=seqused_k,
                               window_size=(left, right))
        return out, None, None, None, None


@pytest.fixture
def stand_in(monkeypatch):
    fake = FlashStandIn()
    aten_op = torch.ops.aten._flash_attention_forward

    class AtenFlash:
        default = aten_op.default  # its schema: what supports_window reads

        def __call__(self, *args, **kwargs):
            return fake.aten_flash(*args, **kwargs)

    monkeypatch.setattr(varlen, "_flash_attn", lambda: fake.flash_attn_varlen_func)
    monkeypatch.setattr(torch_varlen, "varlen_attn", fake.varlen_attn)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", AtenFlash())
    varlen.supports_window.cache_clear()
    yield fake
    varlen.supports_window.cache_clear()


@pytest.mark.parametrize("impl", ["flash_attn", "torch.varlen", "aten.flash"])
@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_cuda_varlen_kernels_take_the_window_as_flash_attention_does(name, impl, stand_in):
    structure, batch, q_len, kv_len = WINDOWED[name]
    q, k, v = qkv(batch, q_len, kv_len, torch.float32)
    allowed = structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len)
    actual = execute.run(structure, f"varlen.{impl}", q, k, v, scale=0.3, enable_gqa=True, fill="zero")
    assert_same(actual, reference.attention(q, k, v, allowed, scale=0.3))
    w = structure.window
    windowed = [c for c in stand_in.calls if c["window_size"] not in ((-1, -1), (-1, 0), (None, None))]
    assert windowed and all(c["window_size"] == (w - 1, 0) for c in windowed), stand_in.calls
    if impl == "aten.flash":
        assert not any(c["is_causal"] for c in windowed)  # as varlen_attn passes a window: a (left, 0) window


def test_varlen_adapters_say_which_take_windows():
    assert varlen.supports_window("reference")
    assert varlen.supports_window("torch.varlen") == ("window_size" in inspect.signature(
        torch_varlen.varlen_attn).parameters)
    assert varlen.supports_window("aten.flash")  # torch 2.13's schema: window_size_left/right
    with pytest.raises(ValueError):
        varlen.varlen_attention(*(torch.zeros(2, 1, 8) for _ in range(3)), torch.tensor([0, 2]), torch.tensor([0, 2]),
                                2, 2, causal=False, scale=None, impl="reference", window=2)  # a window is causal


# ----------------------------------------------------------------------------------- choosing the kernel


def test_the_capability_table_says_which_kernels_take_windows():
    takes = {k.name for k in capabilities.TABLE if capabilities.supports(
        k.name, device=k.devices[0], dtype=k.dtypes[0], window=True) is None}
    assert takes == {"sdpa.split", "varlen.flash_attn", "varlen.torch.varlen", "varlen.aten.flash",
                     "varlen.reference", "flex", "reference"}
    assert "no sliding window" in capabilities.supports("sdpa.cudnn", device="cuda", dtype=torch.bfloat16, window=True)
    assert "from torch 2.11" in capabilities.supports("varlen.torch.varlen", device="cuda", dtype=torch.bfloat16,
                                                      window=True, version=(2, 10))


def test_windowed_varlen_first_on_cuda(monkeypatch):
    structure = Causal("top_left", 512)
    kernel, why = execute.choose_kernel(structure, 2, 4096, 4096, CUDA, torch.bfloat16, 128)
    assert kernel == "varlen.torch.varlen" and "window_size=(511, 0)" in why
    monkeypatch.setattr(capabilities, "torch_version", lambda: (2, 10))  # varlen_attn takes no window there
    kernel, _ = execute.choose_kernel(structure, 2, 4096, 4096, CUDA, torch.bfloat16, 128)
    assert kernel == "varlen.aten.flash"


def test_band_blocks_on_cpu_by_counting_scores():
    kernel, why = execute.choose_kernel(Causal("top_left", 256), 2, 4096, 4096, CPU, torch.float32, 64)
    assert kernel == "sdpa.split" and "blocks of 256 query rows" in why and "% of the dense scores" in why
    kernel, why = execute.choose_kernel(Causal("top_left", 3900), 2, 4096, 4096, CPU, torch.float32, 64)
    assert kernel == "sdpa.split" and "50% of the dense scores" in why  # the first block is causal: half a square
    kernel, why = execute.choose_kernel(Causal("bottom_right", 3500), 2, 16, 4096, CPU, torch.float32, 64)
    assert kernel is None and "dense mask is kept" in why  # 16 rows over 3515 of 4096 keys: not worth a mask
    kernel, why = execute.choose_kernel(Causal("top_left", 4), 1, 4096, 4096, CPU, torch.float32, 64)
    assert kernel == "sdpa.split" and "16 SDPA call(s)" in why  # the blocks grow to fit the call budget


def test_right_padding_with_a_wide_window_stays_dense():
    """Rows past a sequence's end see a shrinking key range each: one segment per row, too many to run apart."""
    kernel, why = execute.choose_kernel(Padding((512, 100), "right", "top_left", 400), 2, 512, 512, CUDA,
                                        torch.bfloat16, 64)
    assert kernel is None and "shrinking key range" in why


@pytest.mark.parametrize("forced", ["varlen.torch.varlen", "varlen.aten.flash"])
def test_forcing_a_kernel_without_windows_keeps_the_mask(forced, monkeypatch):
    monkeypatch.setattr(capabilities, "torch_version", lambda: (2, 10))
    monkeypatch.setattr(varlen, "supports_window", lambda impl: impl == "reference")
    kernel, why = execute.choose_kernel(Causal("top_left", 4), 1, 64, 64, CUDA, torch.bfloat16, 64, forced)
    assert kernel is None and "window" in why


# --------------------------------------------------------------------------------- through the compiler


def gqa_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, repeat_kv(k, H // HKV), repeat_kv(v, H // HKV), attn_mask=mask)


def spell(allowed, spelling, dtype):
    if spelling == "bool":
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(dtype).min if spelling == "finfo.min" else float("-inf")).to(dtype)


@pytest.mark.parametrize("specialize", [True, False])
@pytest.mark.parametrize("spelling", ["bool", "finfo.min"])
@pytest.mark.parametrize("name", ["top_left", "bottom_right_on_a_cache", "left_padding", "right_padding", "long"])
def test_windowed_masks_run_on_band_blocks(name, spelling, specialize):
    structure, batch, q_len, kv_len = WINDOWED[name]
    q, k, v = qkv(batch, q_len, kv_len, torch.float32)
    mask = spell(structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len), spelling, torch.float32)
    c = Compiled(gqa_sdpa, specialize=specialize)
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    detail = c.sites[0].details["mask"]
    assert detail["analysis"] == ("specialized" if specialize else "runtime")
    assert detail["kind"] == structure.kind and detail["window"] == structure.window
    assert detail["kernel"] == "sdpa.split" and "sliding window" in detail["why"]


def test_a_static_sliding_window_mask_is_baked_into_the_graph():
    q, k, v = qkv(2, 12, 12, torch.float32)

    def attn(q, k, v):
        i = torch.arange(12)
        return gqa_sdpa(q, k, v, (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 4))

    c = Compiled(attn)
    assert_same(c(q, k, v), attn(q, k, v))
    detail = c.sites[0].details["mask"]
    assert (detail["analysis"], detail["kind"], detail["window"], detail["kernel"]) == ("static", "causal", 4,
                                                                                         "sdpa.split")
    assert "structured_attention" not in " ".join(c.ops())


@pytest.mark.parametrize("kernel", ["varlen.reference", "flex", "reference"])
def test_forced_windowed_kernels(kernel):
    structure, batch, q_len, kv_len = WINDOWED["left_padding"]
    q, k, v = qkv(batch, q_len, kv_len, torch.float32)
    mask = structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len)  # bool: no-key rows give 0
    c = Compiled(gqa_sdpa, kernel=kernel)
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    assert c.sites[0].details["mask"]["kernel"] == kernel


def test_autotune_times_the_windowed_candidates():
    structure, batch, q_len, kv_len = WINDOWED["long"]
    q, k, v = qkv(batch, q_len, kv_len, torch.float32)
    mask = structure.materialize(q_len, kv_len)
    c = Compiled(gqa_sdpa, autotune=True)
    assert_same(c(q, k, v, mask), gqa_sdpa(q, k, v, mask))
    timed = c.sites[0].details["mask"]["why"][len("autotuned: "):].split(", ")
    assert {t.split(" ")[0] for t in timed} == {"dense", "sdpa.split", "flex"}


def test_gradients_through_band_blocks():
    structure, batch, q_len, kv_len = WINDOWED["left_padding_long"]
    q, k, v = qkv(batch, q_len, kv_len, torch.float32, requires_grad=True)
    mask = structure.materialize(q_len, kv_len).expand(batch, 1, q_len, kv_len)
    g = torch.randn(batch, H, q_len, D)
    g[~mask.any(-1).expand(batch, H, q_len)] = 0  # no gradient into rows with no allowed key (README, Exactness)
    c = Compiled(gqa_sdpa)
    actual = torch.autograd.grad(c(q, k, v, mask), (q, k, v), g)
    expected = torch.autograd.grad(gqa_sdpa(q, k, v, mask), (q, k, v), g)
    assert c.sites[0].details["mask"]["kernel"] == "sdpa.split"
    for a, e in zip(actual, expected):
        assert_same(a, e)
