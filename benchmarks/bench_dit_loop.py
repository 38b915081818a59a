"""Per-step time of a DiT denoising loop (examples/dit_loop.py at a realistic size): original vs attnfx.

    python benchmarks/bench_dit_loop.py --out DIR [--steps 20]

Variants, side by side in one run (bf16, CUDA): the original eagerly, the original under torch.compile,
attnfx.optimize with invariant caching off, on (the default: values reading parameters are computed every
step) and on for everything (cache_invariants="all"). Per-step time is the median over the
steps of a second full loop (the first compiles and learns), timed with CUDA events around each step.
Also: max |difference| of the final latents against the original's, and what was cached.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "examples")]
import attnfx  # noqa: E402
import dit_loop as dit  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
SIZE = dict(channels=64, dim=1536, heads=24, text_dim=2048, depth=8, registers=4)


def loop(model, latents, text, text_mask, img_ids, steps, times=None):
    x = latents
    for i in range(steps):
        t = torch.full((x.shape[0],), 1.0 - i / steps, device=DEV, dtype=DT)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x = x - model(x, t, text, text_mask, img_ids) / steps
        end.record()
        if times is not None:
            times.append((start, end))
    return x


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    model = dit.DiT(**SIZE).to(DEV, DT).eval()
    latents, text, text_mask, img_ids = (t.to(DEV) for t in dit.inputs(batch=2, size=64, text_len=512,
                                                                         channels=SIZE["channels"],
                                                                         text_dim=SIZE["text_dim"]))
    latents, text = latents.to(DT), text.to(DT)
    variants = {
        "original (eager)": model,
        "original (torch.compile)": torch.compile(model),
        "attnfx, no invariant caching": attnfx.optimize(model, cache_invariants=False),
        "attnfx (default)": attnfx.optimize(model),
        "attnfx, cache_invariants='all'": attnfx.optimize(model, cache_invariants="all"),
    }
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "tokens": latents.shape[1] + SIZE["registers"], "text_tokens": text.shape[1], **SIZE}
    print(env, flush=True)
    results, ref = {}, None
    with torch.no_grad():
        for label, fn in variants.items():
            loop(fn, latents, text, text_mask, img_ids, args.steps)  # compile, learn
            times = []
            out = loop(fn, latents, text, text_mask, img_ids, args.steps, times)
            torch.cuda.synchronize()
            ms = sorted(s.elapsed_time(e) for s, e in times)[len(times) // 2]
            ref = out if ref is None else ref
            results[label] = {"per_step_ms": ms, "max_diff_vs_original": (out.float() - ref.float()).abs().max().item()}
            print(f"  {label:30s} {ms:8.3f} ms/step   max diff {results[label]['max_diff_vs_original']:.2e}", flush=True)
    rep = attnfx.report(variants["attnfx (default)"])
    results["cached"] = [g.describe() for g in rep.cached]
    results["not_cached"] = [g.describe() for g in rep.not_cached]
    for g in rep.cached:
        print("   cached:", g.describe())
    for g in rep.not_cached:
        print("   not cached:", g.describe())
    with open(os.path.join(args.out, "bench_dit_loop.json"), "w") as f:
        json.dump({"env": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
