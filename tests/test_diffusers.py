"""diffusers attention code nobody here wrote: processors with GQA and manual attention, and a FLUX
block (multi-head, no mask) that must be left alone with identical outputs."""

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, LuminaAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
from helpers import assert_same

import attnfx


def test_lumina_gqa_processor_is_rewritten():
    attn = Attention(query_dim=64, heads=4, kv_heads=2, dim_head=16, processor=LuminaAttnProcessor2_0(),
                     bias=False).eval()
    x, enc = torch.randn(2, 6, 64), torch.randn(2, 5, 64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False

    def run(x, enc, mask):
        return attn(x, encoder_hidden_states=enc, attention_mask=mask)

    opt = attnfx.optimize(run, compiler="eager")
    with torch.no_grad():
        assert_same(opt(x, enc, mask), run(x, enc, mask))
    (site,) = attnfx.report(opt).sites
    assert site.module == "attn" and site.source.startswith("diffusers/models/attention_processor.py:")
    assert site.applied == ["gqa", "mask_structure"]
    assert site.details["mask"] == {"analysis": "specialized", "kind": "padding", "side": "right", "lengths": [5, 3],
                                    "causal": None, "kernel": "sdpa.split", "why": "2 segment(s), one SDPA call each"}


def test_classic_baddbmm_processor_becomes_sdpa():
    attn = Attention(query_dim=64, heads=4, dim_head=16, processor=AttnProcessor()).eval()
    x = torch.randn(2, 6, 64)
    mask = torch.zeros(2, 1, 6)
    mask[1, :, 4:] = -10000.0

    def run(x, mask):
        return attn(x, attention_mask=mask)

    opt = attnfx.optimize(run, compiler="eager")
    with torch.no_grad():
        assert_same(opt(x, mask), run(x, mask))
    (site,) = attnfx.report(opt).sites
    assert site.kind == "manual" and site.applied[0] == "manual_attention"
    # -10000.0 is not -inf/finfo.min: the runtime analysis sees an additive bias and keeps it dense
    assert site.details["mask"]["kind"] == "bias" and "additive bias" in site.details["mask"]["why"]


def test_flux_block_multi_head_attention_is_left_alone():
    block = FluxTransformerBlock(dim=64, num_attention_heads=4, attention_head_dim=16).eval()
    hs, enc, temb = torch.randn(1, 16, 64), torch.randn(1, 8, 64), torch.randn(1, 64)
    rope = (torch.randn(24, 16), torch.randn(24, 16))

    def run(hs, enc, temb):
        return block(hs, enc, temb, image_rotary_emb=rope)

    opt = attnfx.optimize(run, compiler="eager")
    with torch.no_grad():
        for a, e in zip(opt(hs, enc, temb), run(hs, enc, temb)):
            assert torch.equal(a, e)
    (site,) = attnfx.report(opt).sites
    assert site.module == "block.attn" and not site.rewritten and site.reason == "no pattern applies"
