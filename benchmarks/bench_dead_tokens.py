"""Dead-token benchmark: a whole HunyuanImage3 attention layer at step 1, only the image rows read.

    python benchmarks/bench_dead_tokens.py --out DIR [--iters 30] [--small --device cpu]

The layer is ``examples/hunyuan_image3.py`` (fused qkv projection, RoPE, per-head RMSNorm, static KV cache,
repeat_kv, bool mask, o_proj) at the real config (hidden 4096, 32/8 heads, head_dim 128), bf16, B=2
(CFG), T text tokens + N image tokens + 2 markers. Two ways the pipeline reads the image rows:
  slice           ``out[:, T+1 : T+1+N]`` (static)
  masked_select   ``out.masked_select(image_mask)`` with ``image_mask`` passed in (run-time index set;
                  needs ``capture_dynamic_output_shape_ops``)
Variants, side by side in one process: the original eagerly, the original under torch.compile
(Inductor), attnfx.optimize without ``dead_tokens``, attnfx.optimize. For each: median ms over rotating
inputs (CUDA events), peak extra MiB, max |error| vs the float32 layer. Writes DIR/bench_dead_tokens.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
import hunyuan_image3 as hy  # noqa: E402

import attnfx  # noqa: E402
from attnfx.patterns import NAMES  # noqa: E402


class MaskedImageRows(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x, mask, pos, kv_len, image_mask):
        y = self.attn(x, mask, pos, kv_len)
        return y.masked_select(image_mask[..., None]).view(y.shape[0], -1, y.shape[-1])


def build(read, cfg, t, n, b, device, dtype):
    attn = hy.make(cfg, t, n, batch=b, device=device, dtype=dtype)
    model = hy.ImageRows(attn, t, n) if read == "slice" else MaskedImageRows(attn)
    s = t + n + 2

    def inputs(seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(b, s, cfg.hidden, generator=g).to(device, dtype)
        args = [x, hy.step1_mask(t, n, b, device), torch.arange(s, device=device), s]
        if read == "masked_select":
            args.append(hy.image_mask(t, n, b, device))
        return args

    return model, inputs


def time_ms(fn, input_sets, iters, device):
    for args in input_sets[:2]:
        fn(*args)
    if device == "cuda":
        torch.cuda.synchronize()
        events = []
        for i in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*input_sets[i % len(input_sets)])
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in events)
    else:
        times = []
        for i in range(iters):
            t0 = time.perf_counter()
            fn(*input_sets[i % len(input_sets)])
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
    return times[len(times) // 2]


def peak_extra_mib(fn, args, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*args)
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(read, cfg, t, n, b, iters, device, dtype):
    model, inputs = build(read, cfg, t, n, b, device, dtype)
    input_sets = [inputs(i) for i in range(3)]
    ref_model = copy.deepcopy(model).float()
    with torch.no_grad():
        ref = ref_model(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in input_sets[0]])
    del ref_model
    torch._dynamo.reset()
    without = tuple(p for p in NAMES if p != "dead_tokens")
    variants = {
        "original (eager)": model,
        "original (torch.compile)": torch.compile(model),
        "attnfx.optimize without dead_tokens": attnfx.optimize(model, patterns=without),
        "attnfx.optimize": attnfx.optimize(model, verify=True, rtol=3e-2, atol=3e-2),
    }
    rows = {}
    for label, fn in variants.items():
        with torch.no_grad():
            t0 = time.perf_counter()
            out = fn(*input_sets[0])
            first = time.perf_counter() - t0
            err = (out.float() - ref).abs().max().item()
            ms = time_ms(fn, input_sets, iters, device)
            mib = peak_extra_mib(fn, input_sets[0], device)
        rows[label] = {"ms": round(ms, 3), "peak_extra_mib": None if mib is None else round(mib, 1),
                       "max_abs_err_vs_fp32": err, "first_call_s": round(first, 1)}
        print(f"  {label:38s} {ms:8.3f} ms  peak {mib if mib is None else round(mib, 1)} MiB  err {err:.2e}",
              flush=True)
    report = attnfx.report(variants["attnfx.optimize"]).to_dict()
    site = report["sites"][0]
    base = rows["original (eager)"]["ms"]
    for r in rows.values():
        r["speedup_vs_eager"] = round(base / r["ms"], 2)
    return {"rows": rows, "dead_tokens": site.get("dead_tokens"), "ops_on_fewer_rows": site.get("ops_on_fewer_rows"),
            "specialized_on": site.get("specialized_on"), "savings": site.get("savings"),
            "speedup_vs_without_dead_tokens": round(rows["attnfx.optimize without dead_tokens"]["ms"]
                                                    / rows["attnfx.optimize"]["ms"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="the small config (a smoke test on CPU)")
    p.add_argument("--reads", default="slice,masked_select")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device (use --device cpu --small for a smoke test)")
    os.makedirs(args.out, exist_ok=True)
    cfg = hy.SMALL if args.small else hy.Config()
    t, n, b = (20, 64, 2) if args.small else (1000, 4096, 2)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__, "date": datetime.date.today().isoformat(),
               "shape": {"T": t, "N": n, "B": b, "hidden": cfg.hidden, "heads": cfg.heads, "kv_heads": cfg.kv_heads,
                         "head_dim": cfg.head_dim, "dtype": str(dtype)}, "scenarios": {}}
    for read in args.reads.split(","):
        print(f"{read}:", flush=True)
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=read == "masked_select"):
            results["scenarios"][read] = run(read, cfg, t, n, b, args.iters, args.device, dtype)
        print(json.dumps({k: v for k, v in results["scenarios"][read].items() if k != "rows"}), flush=True)
    with open(os.path.join(args.out, "bench_dead_tokens.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
