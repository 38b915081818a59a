"""Attention benchmark: the original attention module vs attnfx.optimize of the same module, side by side.

    python benchmarks/bench_attention.py --out DIR [--scenarios a,b,...] [--iters 50]

Scenarios (bf16, CUDA) follow the real models' attention code:
  hunyuan_step2_*   HunyuanImage3 steps >= 2: repeat_kv + bool mask (timestep -> prefix, image -> all but EOI)
  bagel_cfg         Bagel packed CFG branches: grouped .repeat + block-diagonal bool mask, KV 1100/1070/1040
  llama_prefill_*   HF Llama padded causal prefill: repeat_kv + (B, 1, S, S) bool causal & padding mask
  unmasked_*        no mask: MHA (nothing to rewrite) and GQA with repeat_kv
For each: median ms over rotating input sets (CUDA events), useful TFLOP/s (4·d·Hq·allowed pairs),
peak extra MiB over the inputs, max error vs a float32 reference — for the original eagerly, the
original under torch.compile (Inductor), and attnfx.optimize (Inductor); plus the dense-SDPA ceiling
measured in the same run. Writes DIR/bench_attention.json and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attnfx  # noqa: E402
from attnfx.backends import reference  # noqa: E402

DEV = "cuda"
DT = torch.bfloat16


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class RepeatKVAttention(nn.Module):
    """HF / HunyuanImage3: repeat_kv, .contiguous(), SDPA with the model's mask."""

    def __init__(self, n_rep):
        super().__init__()
        self.n_rep = n_rep

    def forward(self, q, k, v, mask):
        k = repeat_kv(k, self.n_rep).contiguous()
        v = repeat_kv(v, self.n_rep).contiguous()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class ImageRowsAttention(RepeatKVAttention):
    """HunyuanImage3 step 1: attention over every token, only the image rows' outputs are read."""

    def __init__(self, n_rep, rows):
        super().__init__(n_rep)
        self.rows = rows

    def forward(self, q, k, v, mask):
        return super().forward(q, k, v, mask)[:, :, self.rows]


class GroupedRepeatAttention(nn.Module):
    """Bagel: packed (tokens, heads, dim) K/V, grouped .repeat on a new axis, and the block-diagonal mask
    built in forward from the branch lengths, as examples/bagel.py does."""

    def __init__(self, n_rep, q_lens, kv_lens):
        super().__init__()
        self.n_rep, self.q_lens, self.kv_lens = n_rep, q_lens, kv_lens

    def forward(self, q, k, v, mask=None):  # q (1, H, Tq, D); k, v (Tk, Hkv, D)
        t, h, d = k.shape
        k = k[:, :, None, :].repeat(1, 1, self.n_rep, 1).reshape(t, h * self.n_rep, d).transpose(0, 1)[None]
        v = v[:, :, None, :].repeat(1, 1, self.n_rep, 1).reshape(t, h * self.n_rep, d).transpose(0, 1)[None]
        mask = torch.zeros(q.shape[-2], t, dtype=torch.bool, device=q.device)
        q0 = k0 = 0
        for lq, lk in zip(self.q_lens, self.kv_lens):
            mask[q0:q0 + lq, k0:k0 + lk] = True
            q0, k0 = q0 + lq, k0 + lk
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class PlainAttention(nn.Module):
    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def hunyuan_step2(t, n, b):
    def build(g):
        s = t + n + 2
        q = torch.randn(b, 32, 1 + n, 128, device=DEV, dtype=DT, generator=g)
        k = torch.randn(b, 8, s, 128, device=DEV, dtype=DT, generator=g)
        v = torch.randn(b, 8, s, 128, device=DEV, dtype=DT, generator=g)
        full = torch.ones(s, s, dtype=torch.bool, device=DEV).tril()
        full[t + 1:t + 1 + n, t + 1:t + 1 + n] = True
        mask = full[t:t + 1 + n].clone()
        mask[:, -1] = False
        return (q, k, v, mask[None, None].expand(b, 1, 1 + n, s).contiguous())
    return RepeatKVAttention(4), build


def hunyuan_step1(t, n, b):
    def build(g):
        s = t + n + 2
        q = torch.randn(b, 32, s, 128, device=DEV, dtype=DT, generator=g)
        k = torch.randn(b, 8, s, 128, device=DEV, dtype=DT, generator=g)
        v = torch.randn(b, 8, s, 128, device=DEV, dtype=DT, generator=g)
        mask = torch.ones(s, s, dtype=torch.bool, device=DEV).tril()
        mask[t + 1:t + 1 + n, t + 1:t + 1 + n] = True
        return (q, k, v, mask[None, None].expand(b, 1, s, s).contiguous())
    return ImageRowsAttention(4, slice(t + 1, t + 1 + n)), build


def bagel_cfg(n=1024, kv=(1100, 1070, 1040)):
    def build(g):
        q = torch.randn(1, 28, n * len(kv), 128, device=DEV, dtype=DT, generator=g)
        k = torch.randn(sum(kv), 4, 128, device=DEV, dtype=DT, generator=g)
        v = torch.randn(sum(kv), 4, 128, device=DEV, dtype=DT, generator=g)
        mask = torch.zeros(n * len(kv), sum(kv), dtype=torch.bool, device=DEV)
        k0 = 0
        for i, lk in enumerate(kv):
            mask[i * n:(i + 1) * n, k0:k0 + lk] = True
            k0 += lk
        return (q, k, v, mask)  # the mask is passed for the reference only; the module builds its own
    return GroupedRepeatAttention(7, (n,) * len(kv), kv), build


def llama_prefill(side, lengths=(2048, 1500, 1024, 700), s=2048):
    def build(g):
        b = len(lengths)
        q = torch.randn(b, 32, s, 128, device=DEV, dtype=DT, generator=g)
        k = torch.randn(b, 8, s, 128, device=DEV, dtype=DT, generator=g)
        v = torch.randn(b, 8, s, 128, device=DEV, dtype=DT, generator=g)
        idx = torch.arange(s, device=DEV)
        keep = torch.stack([(idx < n) if side == "right" else (idx >= s - n) for n in lengths])  # (B, S)
        mask = (idx[None, :] <= idx[:, None])[None] & keep[:, None, :]
        return (q, k, v, mask[:, None])
    return RepeatKVAttention(4), build


def unmasked(gqa, s=4608, heads=24):
    def build(g):
        kvh = heads // 4 if gqa else heads
        q = torch.randn(1, heads, s, 128, device=DEV, dtype=DT, generator=g)
        k = torch.randn(1, kvh, s, 128, device=DEV, dtype=DT, generator=g)
        v = torch.randn(1, kvh, s, 128, device=DEV, dtype=DT, generator=g)
        return (q, k, v, None)
    return (RepeatKVAttention(4) if gqa else PlainAttention()), build


SCENARIOS = {
    "hunyuan_step2_T1000_N4096_B1": lambda: hunyuan_step2(1000, 4096, 1),
    "hunyuan_step2_T300_N1024_B1": lambda: hunyuan_step2(300, 1024, 1),
    "hunyuan_step2_T1000_N4096_B2": lambda: hunyuan_step2(1000, 4096, 2),
    "hunyuan_step1_T1000_N4096_B2": lambda: hunyuan_step1(1000, 4096, 2),
    "bagel_cfg_1100_1070_1040": lambda: bagel_cfg(),
    "llama_prefill_right_padding": lambda: llama_prefill("right"),
    "llama_prefill_left_padding": lambda: llama_prefill("left"),
    "unmasked_mha": lambda: unmasked(False),
    "unmasked_gqa_repeat_kv": lambda: unmasked(True),
}


def allowed_pairs(inputs, module) -> tuple[torch.Tensor | None, int]:
    """The mask, and the (query, key) pairs whose result is read (useful work)."""
    q, k, v, mask = inputs
    heads = q.shape[-3]
    if mask is None:
        return None, q.shape[0] * q.shape[-2] * (k.shape[-2] if k.dim() == 4 else k.shape[0]) * heads
    m = mask if mask.dim() == 4 else mask[None, None]
    m = m.expand(q.shape[0], 1, q.shape[-2], m.shape[-1])
    read = m[:, :, module.rows] if isinstance(module, ImageRowsAttention) else m
    return m, int(read.sum()) * heads


def fp32_reference(module, inputs):
    q, k, v, mask = inputs
    if isinstance(module, GroupedRepeatAttention):
        k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    m, _ = allowed_pairs(inputs, module)
    out = reference.attention(q.float(), k.float(), v.float(), m, fill="zero")
    return out[:, :, module.rows] if isinstance(module, ImageRowsAttention) else out


def time_it(fn, input_sets, iters, sync_each=False):
    """Median ms per call. Like triton's do_bench: events around each call, no host sync in between
    (the CPU queues ahead as in a real model); with sync_each, launch latency is charged too."""
    for inputs in input_sets[:2]:
        fn(*inputs)
    torch.cuda.synchronize()
    events = []
    for i in range(iters):
        inputs = input_sets[i % len(input_sets)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs)
        end.record()
        events.append((start, end))
        if sync_each:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def kernel_profile(fn, inputs, top=12):
    """The CUDA kernels one call launches, with their device time (µs)."""
    from torch.profiler import ProfilerActivity, profile

    fn(*inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn(*inputs)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 5, e.count // 5) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return [{"kernel": k[:90], "us": round(t, 1), "launches": c} for k, t, c in rows[:top]]


def peak_extra_mib(fn, inputs):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def dense_ceiling(iters):
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(1, 32, 8192, 128, device=DEV, dtype=DT, generator=g) for _ in range(3))
    ms = time_it(lambda: F.scaled_dot_product_attention(q, k, v), [()], iters)
    return 4 * 128 * 32 * 8192 * 8192 / (ms * 1e-3) / 1e12, ms


def run_scenario(name, iters):
    module, build = SCENARIOS[name]()
    module = module.to(DEV)
    gens = [torch.Generator(device=DEV).manual_seed(i) for i in range(3)]
    input_sets = [build(g) for g in gens]
    _, pairs = allowed_pairs(input_sets[0], module)
    flops = 4 * 128 * pairs
    ref = fp32_reference(module, input_sets[0])
    rows = {}
    torch._dynamo.reset()
    variants = {
        "original (eager)": module,
        "original (torch.compile)": torch.compile(module),
        "attnfx.optimize": attnfx.optimize(module, verify=True, rtol=3e-2, atol=3e-2),
    }
    for label, fn in variants.items():
        with torch.no_grad():
            t0 = time.perf_counter()
            out = fn(*input_sets[0])
            first = time.perf_counter() - t0
            err = (out.float() - ref).abs().nan_to_num(0.0).max().item()
            ms = time_it(fn, input_sets, iters)
            ms_sync = time_it(fn, input_sets, iters, sync_each=True)
            mib = peak_extra_mib(fn, input_sets[0])
            kernels = kernel_profile(fn, input_sets[0])
        gpu_ms = sum(kr["us"] for kr in kernels) / 1e3  # device time per call, all kernels
        rows[label] = {"median_ms": ms, "median_ms_synced": ms_sync, "useful_tflops": flops / (ms * 1e-3) / 1e12,
                       "gpu_kernel_ms": gpu_ms, "peak_extra_mib": mib, "max_err_vs_fp32": err, "first_call_s": first,
                       "kernels": kernels}
    rep = attnfx.report(variants["attnfx.optimize"])
    rows["attnfx.optimize"]["report"] = [s.to_dict() for s in rep.sites]
    return {"scenario": name, "useful_gflop": flops / 1e9, "rows": rows}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--profile", action="store_true", help="print each variant's CUDA kernels")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat()}
    ceiling, ceiling_ms = dense_ceiling(args.iters)
    print(f"{env}\ndense SDPA ceiling (8192^2, 32 heads, d128, bf16): {ceiling:.0f} TFLOP/s ({ceiling_ms:.3f} ms)",
          flush=True)
    results = []
    for name in args.scenarios.split(","):
        try:
            res = run_scenario(name, args.iters)
        except Exception as e:  # one broken scenario must not lose the others
            import traceback

            traceback.print_exc()
            res = {"scenario": name, "error": f"{type(e).__name__}: {e}"}
        results.append(res)
        with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
            json.dump({"env": env, "dense_ceiling_tflops": ceiling, "results": results}, f, indent=1, default=str)
        if "rows" not in res:
            print(f"\n{name}: ERROR {res['error']}", flush=True)
            continue
        print(f"\n{name}  ({res['useful_gflop']:.1f} useful GFLOP)")
        base = res["rows"]["original (eager)"]["median_ms"]
        for label, r in res["rows"].items():
            print(f"  {label:26s} {r['median_ms']:8.3f} ms  x{base / r['median_ms']:5.2f}  "
                  f"{r['useful_tflops']:6.0f} TFLOP/s ({100 * r['useful_tflops'] / ceiling:3.0f}% of dense)  "
                  f"{r['peak_extra_mib']:8.1f} MiB  err {r['max_err_vs_fp32']:.2e}  "
                  f"(GPU kernels {r['gpu_kernel_ms']:.3f} ms; synced per call {r['median_ms_synced']:.3f} ms)",
                  flush=True)
            if args.profile:
                for kr in r["kernels"]:
                    print(f"      {kr['us']:9.1f} us x{kr['launches']}  {kr['kernel']}")
        for s in res["rows"]["attnfx.optimize"]["report"]:
            print(f"    site: applied={s['applied']} mask={s.get('mask')} reason={s['reason']!r}", flush=True)


if __name__ == "__main__":
    main()
