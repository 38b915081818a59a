"""GPU correctness of attnfx's rewrites: optimized vs original on CUDA, through Inductor.

    python benchmarks/gpu_correctness.py --out DIR

Tiny random-weight HF models (sdpa and eager attention, left padding, bf16 and fp32) — among them models
with sliding-window layers (Mistral, Gemma3, Cohere2, OLMo3, EXAONE4: the windows on FlashAttention's
window_size), Bloom (batch×heads views, ALiBi) and Falcon —, every GQA spelling of tests/test_gqa.py with bool
masks that include rows with no allowed key, every mask structure of tests/test_mask_structure.py and
tests/test_windows.py on each CUDA kernel, and each windowed varlen kernel against the reference on packed
sequences. FP8 cases (``--filter fp8``; need the cuDNN frontend): fp8=True on self-attention (plain, causal,
GQA two ways, through Inductor, under CUDA graphs with a skipped step), a refused cross-attention and a small
DiT loop; bounded, not exact: each checks the relative L2 against the original and that the sites ran FP8
(or say why not). Each case runs attnfx.optimize(..., verify=True) — HF models through Inductor, the spellings with
the eager inner compiler (the CUDA kernels are the same) — compares to the original, and records the report.
Writes DIR/gpu_correctness.json; prints one line per case and a final tally.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

import attnfx  # noqa: E402

TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}


def hf_cases(dev):
    from hf_models import batch, build

    for arch in ("llama", "qwen2", "qwen3", "mistral"):
        for attn in ("sdpa", "eager"):
            for dtype in (torch.bfloat16, torch.float32):
                def case(arch=arch, attn=attn, dtype=dtype):
                    model = build(arch, attn).to(dev, dtype)
                    ids, mask = batch(37, pad=5)
                    ids, mask = ids.to(dev), mask.to(dev)
                    opt = attnfx.optimize(model, verify=True, rtol=TOL[dtype], atol=TOL[dtype])
                    with torch.no_grad():
                        out = opt(ids, attention_mask=mask).logits
                        ref = model(ids, attention_mask=mask).logits
                    keep = mask.bool()
                    err = (out - ref)[keep].abs().max().item()
                    return err, attnfx.report(opt)
                yield f"hf {arch} {attn} {str(dtype)[6:]}", case


def _hf_case(model, dev, dtype, length=37, pad=5):
    opt = attnfx.optimize(model.to(dev, dtype), verify=True, rtol=TOL[dtype], atol=TOL[dtype])
    ids, mask = batch_of(length, pad)
    ids, mask = ids.to(dev), mask.to(dev)
    with torch.no_grad():
        out = opt(ids, attention_mask=mask).logits
        ref = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    return (out - ref)[keep].abs().max().item(), attnfx.report(opt)


def batch_of(length, pad):
    from hf_models import batch

    return batch(length, pad=pad)


def sliding_cases(dev):
    """Sliding-window layers (window 8 over 37 tokens, left padding): local layers on a windowed kernel."""
    from hf_models import SLIDING, build_sliding

    for arch in sorted(SLIDING):
        for attn in ("sdpa", "eager"):
            for dtype in (torch.bfloat16, torch.float32):
                if build_sliding(arch, attn) is None:
                    continue  # not in this transformers

                def case(arch=arch, attn=attn, dtype=dtype):
                    return _hf_case(build_sliding(arch, attn, window=8), dev, dtype)
                yield f"hf-window {arch} {attn} {str(dtype)[6:]}", case


def manual_cases(dev):
    """Eager attention manual_attention rewrites: Bloom (batch×heads views, ALiBi), Falcon variants."""
    import transformers

    models = {
        "bloom": lambda: transformers.BloomForCausalLM(transformers.BloomConfig(
            vocab_size=128, hidden_size=64, n_layer=2, n_head=4)),
        "falcon": lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
        "falcon-new-arch": lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            new_decoder_architecture=True, num_kv_heads=2)),
        "falcon-alibi": lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
            multi_query=False)),
    }
    for name, make in sorted(models.items()):
        for dtype in (torch.bfloat16, torch.float32):
            def case(make=make, dtype=dtype):
                torch.manual_seed(0)
                model = make()
                model.config._attn_implementation = "eager"
                return _hf_case(model.eval(), dev, dtype)
            yield f"hf-manual {name} eager {str(dtype)[6:]}", case


def window_cases(dev):
    """Each windowed varlen kernel on packed sequences of different lengths against the reference (fp32):
    FlashAttention's window_size=(w - 1, 0) must give HF's i - w < j <= i, bottom-right aligned."""
    from attnfx.backends import reference, varlen

    shapes = [((128, 128), (128, 128), 32), ((64, 64), (300, 180), 50), ((200, 77), (200, 77), 1),
              ((100,), (100,), 150), ((300, 40), (64, 40), 16)]
    for impl in varlen.implementations(dev, torch.bfloat16):
        if impl == "reference" or not varlen.supports_window(impl):
            continue
        for lqs, lks, w in shapes:
            def case(impl=impl, lqs=lqs, lks=lks, w=w):
                q = torch.randn(sum(lqs), 8, 64, device=dev, dtype=torch.bfloat16)
                k, v = (torch.randn(sum(lks), 2, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
                cu = lambda ls: torch.tensor([0, *ls], device=dev).cumsum(0).to(torch.int32)  # noqa: E731
                out = varlen.varlen_attention(q, k, v, cu(lqs), cu(lks), max(lqs), max(lks), causal=True,
                                              scale=None, impl=impl, window=w)
                ref = reference.varlen(q.float(), k.float(), v.float(), cu(lqs), cu(lks), max(lqs), max(lks),
                                       causal=True, window_size=(w - 1, 0))
                torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
                return (out.float() - ref).abs().max().item(), None
            yield f"window {impl} q{lqs} k{lks} w{w}", case


def gqa_cases(dev):
    from test_gqa import SPELLINGS, B, D, H, L, S, make_kv

    for name, (layout, expand) in sorted(SPELLINGS.items()):
        for dtype in (torch.bfloat16, torch.float32):
            def case(layout=layout, expand=expand, dtype=dtype):
                batch = 1 if layout == "thd" else B
                q = torch.randn(batch, H, L, D, dtype=dtype, device=dev)
                k, v = (t.to(dev) for t in make_kv(layout, dtype, batch))
                allowed = torch.rand(batch, 1, L, S, device=dev) > 0.3
                allowed[..., 1, :] = False  # a row with no allowed key

                def attn(q, k, v, m):
                    return F.scaled_dot_product_attention(q, expand(k), expand(v), attn_mask=m)

                opt = attnfx.optimize(attn, compiler="eager", verify=True, rtol=TOL[dtype], atol=TOL[dtype])
                out, ref = opt(q, k, v, allowed), attn(q, k, v, allowed)
                torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)
                return (out - ref).abs().nan_to_num().max().item(), attnfx.report(opt)
            yield f"gqa {name} {str(dtype)[6:]}", case


def structure_cases(dev):
    """Every mask structure of tests/test_mask_structure.py and tests/test_windows.py (sliding windows), each
    CUDA kernel, bool and finfo.min masks."""
    from test_mask_structure import STRUCTURES, spell
    from test_windows import WINDOWED

    from attnfx.backends import varlen

    kernels = [None, "autotune", "sdpa.split", "flex"] + [f"varlen.{i}" for i in varlen.implementations(
        dev, torch.bfloat16) if i != "reference"]
    structures = {**STRUCTURES, **{f"window_{n}": s for n, s in WINDOWED.items()}}
    for name, (structure, batch, q_len, kv_len) in sorted(structures.items()):
        for kernel in kernels:
            for spelling in ("bool", "finfo.min"):
                def case(structure=structure, batch=batch, q_len=q_len, kv_len=kv_len, kernel=kernel,
                         spelling=spelling):
                    scale = 16  # sizes x16: kernels tile in blocks of 64-128 rows
                    ql, kl = q_len * scale, kv_len * scale
                    s = _scaled(structure, scale)
                    q = torch.randn(batch, 8, ql, 64, device=dev, dtype=torch.bfloat16)
                    k = torch.randn(batch, 2, kl, 64, device=dev, dtype=torch.bfloat16)
                    v = torch.randn(batch, 2, kl, 64, device=dev, dtype=torch.bfloat16)
                    mask = spell(s.materialize(ql, kl, dev).expand(batch, 1, ql, kl), spelling, torch.bfloat16)

                    def attn(q, k, v, m):
                        return F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1),
                                                              v.repeat_interleave(4, 1), attn_mask=m)

                    opts = {"autotune": True} if kernel == "autotune" else {"kernel": kernel} if kernel else {}
                    opt = attnfx.optimize(attn, compiler="eager", verify=True, rtol=3e-2, atol=3e-2, **opts)
                    out, ref = opt(q, k, v, mask), attn(q, k, v, mask)
                    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2, equal_nan=True)
                    return (out - ref).abs().nan_to_num().max().item(), attnfx.report(opt)
                yield f"mask {name} {kernel or 'auto'} {spelling}", case


def fp8_cases(dev):
    """fp8=True: outputs within a relative L2 bound of the original (float32 reference where cheap), sites that
    ran FP8 on the calls they should (per the report), refusals with their reason."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
    import dit_loop as dit

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    def inputs(h=8, hkv=8, s=1000, d=128, b=2):
        q = torch.randn(b, h, s, d, device=dev)
        k = torch.randn(b, hkv, s, d, device=dev) + torch.randn(b, hkv, 1, d, device=dev)
        v = torch.randn(b, hkv, s, d, device=dev) + 2 * torch.randn(b, hkv, 1, d, device=dev)
        return q.bfloat16(), k.bfloat16(), v.bfloat16()

    def ran_fp8(rep, expect: dict | None = None):
        sites = [s for s in rep.sites if "fp8_attention" in s.applied]
        assert sites, f"no site rewritten for FP8: {[s.reason for s in rep.sites]}"
        for s in sites:
            calls = s.details["fp8"].get("calls") or {}
            if expect is not None:
                assert calls == expect, f"calls {calls} != {expect}; last {s.details['fp8'].get('last')}"
            assert calls.get("fp8"), f"the site never ran FP8: {s.details['fp8'].get('last')}"

    for name, call, n_rep in (("self-attention", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), 1),
                              ("causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 1),
                              ("gqa enable_gqa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v,
                                                                                                enable_gqa=True), 4),
                              ("gqa repeat_kv", lambda q, k, v: F.scaled_dot_product_attention(
                                  q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)), 4)):
        for compiler in ("eager", "inductor"):
            def case(call=call, n_rep=n_rep, compiler=compiler):
                q, k, v = inputs(hkv=8 // n_rep)
                opt = attnfx.optimize(call, compiler=compiler, fp8=True, verify=True)
                out = opt(q, k, v)
                err = rel(out, call(q.float(), k.float(), v.float()))
                assert err < 0.03, f"relative L2 {err:.4f} vs float32"
                rep = attnfx.report(opt)
                if n_rep > 1 and not any((s.details.get("fp8") or {}).get("calls", {}).get("fp8") for s in rep.sites):
                    print(f"   note: GQA ran natively: {[s.details.get('fp8', {}).get('last') for s in rep.sites]}")
                else:
                    ran_fp8(rep)
                return err, rep
            yield f"fp8 {name} {compiler}", case

    def cuda_graphs():
        q, k, v = inputs()

        def call(q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

        opt = attnfx.optimize(call, fp8=True, skip_steps="1", mode="reduce-overhead")
        attnfx.reset_steps()
        outs = []
        for _ in range(5):  # steps 0..4; step 1 native: the op must decide on every call, replays included
            outs.append(opt(q, k, v).clone())
        native = call(q, k, v)
        assert torch.equal(outs[1], native), "step 1 (skipped) is not the native kernel's output"
        errs = [rel(o, call(q.float(), k.float(), v.float())) for o in outs]
        assert all(e < 0.03 for e in errs) and not torch.equal(outs[2], native), errs
        ran_fp8(attnfx.report(opt), {"fp8": 4, "native (step skipped)": 1})
        return max(errs), attnfx.report(opt)
    yield "fp8 reduce-overhead skip_steps", cuda_graphs

    def cross():
        q, k, v = inputs()
        call = lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :, :77], v[:, :, :77])  # noqa: E731
        opt = attnfx.optimize(call, fp8=True, verify=True)
        out = opt(q, k, v)
        (site,) = attnfx.report(opt).sites
        assert "cross-attention (77 keys for 1000 queries)" in site.reason, site.reason
        torch.testing.assert_close(out, call(q, k, v), rtol=2e-2, atol=2e-2)
        return (out.float() - call(q, k, v).float()).abs().max().item(), attnfx.report(opt)
    yield "fp8 cross-attention refused", cross

    def loop():
        torch.manual_seed(0)
        model = dit.DiT(dim=256, heads=2, depth=2).to(dev, torch.bfloat16).eval()  # head_dim 128
        latents, text, text_mask, ids = (t.to(dev) for t in dit.inputs(batch=2, size=32))

        def run(m):
            attnfx.reset_steps()
            x = latents.bfloat16()
            with torch.no_grad():
                for i in range(6):
                    t = torch.full((2,), 1 - i / 6, device=dev, dtype=torch.bfloat16)
                    x = x - m(x, t, text.bfloat16(), text_mask, ids) / 6
            return x.float()

        ref = run(attnfx.optimize(model))
        opt = attnfx.optimize(model, fp8=True, skip_steps="0-1", fp8_max_error=0.1)
        out = run(opt)
        cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
        assert cos > 0.99, f"cosine {cos:.5f}"
        ran_fp8(attnfx.report(opt), {"native (step skipped)": 2, "fp8": 4})
        return rel(out, ref), attnfx.report(opt)
    yield "fp8 dit loop skip_steps=0-1", loop


def cudagraph_cases(dev):
    """CUDA graphs (``mode="reduce-overhead"``): replays with masks that change between calls must never reuse
    a plan chosen for another mask; HF generate with a static KV cache through transformers' own compiled
    decoding (CompileConfig with attnfx's backend) gives the eager model's tokens. ``--filter cudagraph``."""
    from hf_models import batch, build

    def replays(q_len=256):
        n_rep = 4

        def attn(q, k, v, mask):
            k = k[:, :, None].expand(-1, -1, n_rep, -1, -1).flatten(1, 2)
            v = v[:, :, None].expand(-1, -1, n_rep, -1, -1).flatten(1, 2)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        q = torch.randn(2, 16, q_len, 64, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(2, 4, q_len, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))

        def mask(pads):
            m = torch.ones(2, 1, q_len, q_len, device=dev, dtype=torch.bool).tril()
            for b, p in enumerate(pads):
                m[b, ..., :p] = False
            return m | torch.eye(q_len, device=dev, dtype=torch.bool)  # no row without a key

        opt = attnfx.optimize(attn, mode="reduce-overhead")
        err = 0.0
        with torch.no_grad():
            for pads in ((30, 0), (30, 0), (0, 90), (30, 0), (7, 7), (30, 0), (0, 90)):
                m = mask(pads)
                out = opt(q, k, v, m)
                err = max(err, (out.float() - attn(q, k, v, m).float()).abs().max().item())
        if err > 3e-2:
            raise AssertionError(f"a replay with a changed mask differs: {err}")
        return err, attnfx.report(opt)

    yield "cudagraph mask replays", replays

    def generate(attn="sdpa"):
        model = build("llama", attn).to(dev, torch.bfloat16)
        ids, mask = batch(29, pad=6)
        ids, mask = ids.to(dev), mask.to(dev)
        kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, cache_implementation="static")
        backend = attnfx.Backend()
        import transformers

        config = transformers.CompileConfig(backend=backend, mode="reduce-overhead", fullgraph=False)
        with torch.no_grad():
            ref = model.generate(ids, disable_compile=True, **kw)
            out = model.generate(ids, compile_config=config, **kw)
        same = (out == ref).float().mean().item()
        if same < 1.0:
            raise AssertionError(f"generated tokens differ from the eager model's: {same:.3f} equal")
        return 0.0, backend.report

    for attn in ("sdpa", "eager"):
        yield f"cudagraph generate static cache {attn}", lambda attn=attn: generate(attn)


def _scaled(structure, f):
    """The same structure with every length multiplied by f."""
    from dataclasses import fields, replace

    from attnfx.masks import Segment

    def grow(x):
        if isinstance(x, Segment):
            return Segment(x.q0 * f, x.q1 * f, x.k0 * f, x.k1 * f, x.causal, x.batch)
        if isinstance(x, tuple):
            return tuple(grow(y) for y in x)
        return x * f if isinstance(x, int) and not isinstance(x, bool) else x

    return replace(structure, **{fl.name: grow(getattr(structure, fl.name)) for fl in fields(structure)})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--filter", default="", help="comma-separated substrings: run only cases whose name has one")
    args = p.parse_args()
    wanted = [w for w in args.filter.split(",") if w]
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    results, failures = [], 0
    for cases in (hf_cases(dev), sliding_cases(dev), manual_cases(dev), gqa_cases(dev), structure_cases(dev),
                  window_cases(dev), fp8_cases(dev), cudagraph_cases(dev)):
        for name, case in cases:
            if wanted and not any(w in name for w in wanted):
                continue
            torch._dynamo.reset()
            torch.manual_seed(0)
            try:
                err, rep = case()
                sites = rep.sites if rep is not None else []
                full = bool(sites) and all("gqa" in s.applied for s in sites)
                if name.startswith(("mask", "hf-window")):
                    full = all("mask_structure" in s.applied for s in sites)
                if name.startswith("hf-manual"):
                    full = bool(sites) and all("manual_attention" in s.applied for s in sites)
                if name.startswith("window "):
                    full = True
                if name.startswith("fp8"):
                    full = all("fp8_attention" in s.applied for s in sites)
                if name.startswith("cudagraph"):
                    full = bool(sites) and all(s.rewritten for s in sites)
                status = "rewritten" if full else "partly refused"
                row = {"case": name, "ok": True, "status": status, "max_err": err,
                       "verified": rep.verified if rep is not None else None,
                       "sites": [s.to_dict() for s in sites]}
                kernels = sorted({(s.details.get("mask") or {}).get("kernel", s.details.get("sdpa_kernel", "?"))
                                  for s in sites})
                reasons = sorted({s.reason for s in sites if s.reason})
                reasons += [s.details["fp8"].get("calls") for s in sites if (s.details.get("fp8") or {}).get("calls")]
                print(f"OK {status:14s} {name:48s} max_err={err:.2e} kernels={kernels} {reasons}", flush=True)
            except Exception as e:
                row = {"case": name, "ok": False, "error": traceback.format_exc()}
                print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            failures += not row["ok"]
            results.append(row)
    with open(os.path.join(args.out, "gpu_correctness.json"), "w") as f:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "results": results}, f,
                  indent=1, default=str)
    print(f"{len(results) - failures}/{len(results)} cases equal to the original (verify passed); "
          f"{sum(r.get('status') == 'rewritten' for r in results)} fully rewritten")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
