"""Probe the attention kernels of this machine's torch: the facts the capability table rests on.

    python benchmarks/probe_kernels.py --out DIR

For SDPA: which kernel the selector picks with expanded K/V vs enable_gqa (per dtype, head_dim,
mask kind, causal, requires_grad); what each kernel returns for a query row with no allowed key,
forward and backward; and the peak memory of GQA + mask. Also: the signatures of
torch.nn.attention.varlen.varlen_attn, aten._flash_attention_forward with fewer K/V heads, and
FlexAttention's availability. Writes DIR/probe_kernels.json and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def env() -> dict:
    dev = torch.device("cuda")
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(dev),
            "capability": list(torch.cuda.get_device_capability(dev)), "date": datetime.date.today().isoformat(),
            "cudnn": torch.backends.cudnn.version()}


def selector(dev) -> list:
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (64, 128, 256):
            for mask_kind in ("none", "bool", "float"):
                for causal in ((False, True) if mask_kind == "none" else (False,)):
                    for rg in (False, True):
                        q = torch.randn(2, 32, 256, d, device=dev, dtype=dtype, requires_grad=rg)
                        k = torch.randn(2, 8, 256, d, device=dev, dtype=dtype, requires_grad=rg)
                        ke = k.detach().repeat_interleave(4, 1).requires_grad_(rg)
                        m = None
                        if mask_kind != "none":
                            mb = torch.rand(2, 1, 256, 256, device=dev) > 0.2
                            m = mb if mask_kind == "bool" else torch.where(mb, 0.0, float("-inf")).to(dtype)
                        exp = torch._fused_sdp_choice(q, ke, ke, m, 0.0, causal, scale=None, enable_gqa=False)
                        gqa = torch._fused_sdp_choice(q, k, k, m, 0.0, causal, scale=None, enable_gqa=True)
                        rows.append({"dtype": str(dtype), "head_dim": d, "mask": mask_kind, "causal": causal,
                                     "requires_grad": rg, "expanded": SDPBackend(exp).name,
                                     "gqa": SDPBackend(gqa).name})
    return rows


def empty_rows(dev) -> list:
    """What each kernel gives for a query row with no allowed key (fwd, and dq of that row)."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for mask_kind in ("bool", "float_neg_inf", "float_finfo_min"):
            for gqa in (False, True):
                torch.manual_seed(0)
                q = torch.randn(1, 4, 8, 64, device=dev, dtype=dtype, requires_grad=True)
                k = torch.randn(1, 2 if gqa else 4, 8, 64, device=dev, dtype=dtype, requires_grad=True)
                v = torch.randn_like(k, requires_grad=True)
                allowed = torch.ones(1, 1, 8, 8, dtype=torch.bool, device=dev).tril()
                allowed[..., 3, :] = False
                m = {"bool": allowed, "float_neg_inf": torch.where(allowed, 0.0, float("-inf")).to(dtype),
                     "float_finfo_min": torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)}[mask_kind]
                for name, be in BACKENDS.items():
                    row = {"dtype": str(dtype), "mask": mask_kind, "gqa": gqa, "kernel": name}
                    try:
                        with sdpa_kernel(be):
                            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa)
                            (dq,) = torch.autograd.grad(o.float().sum(), (q,))
                        r = o[0, :, 3].float()
                        mean_v = v.float().mean(2).repeat_interleave(4 // k.shape[1], 1)[0]  # uniform weights
                        unmasked = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)[0, :, 3].float()
                        row["fwd"] = ("nan" if r.isnan().all() else "zero" if (r == 0).all()
                                      else "mean_v" if torch.allclose(r, mean_v, atol=2e-2)
                                      else "unmasked" if torch.allclose(r, unmasked, atol=2e-2) else "other")
                        row["dq_row_abs_sum"] = float(dq[0, :, 3].float().abs().sum())
                    except Exception as e:
                        row["error"] = str(e).splitlines()[0][:160]
                    rows.append(row)
    return rows


def gqa_mask_memory(dev) -> list:
    """Peak memory and time of expanded-K/V SDPA vs enable_gqa with a bool mask (Hunyuan step >= 2 shape)."""
    out = []
    T, N = 1000, 4096
    L, S = 1 + N, T + 2 + N
    for gqa in (False, True):
        torch.manual_seed(0)
        q = torch.randn(1, 32, L, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 8, S, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        m = torch.ones(1, 1, L, S, dtype=torch.bool, device=dev)
        m[..., S - 1] = False

        def run():
            if gqa:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=m)

        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(20):
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        choice = torch._fused_sdp_choice(q, k if gqa else k.repeat_interleave(4, 1), v if gqa else v.repeat_interleave(4, 1),
                                         m, 0.0, False, scale=None, enable_gqa=gqa)
        out.append({"gqa": gqa, "kernel": SDPBackend(choice).name, "peak_extra_mib": peak / 2**20,
                    "median_ms": times[len(times) // 2]})
    return out


def apis(dev) -> dict:
    info = {}
    try:
        import torch.nn.attention.varlen as vl

        info["varlen_attn"] = str(inspect.signature(vl.varlen_attn))
        q = torch.randn(10, 4, 64, device=dev, dtype=torch.bfloat16)
        k = torch.randn(12, 2, 64, device=dev, dtype=torch.bfloat16)
        cu_q = torch.tensor([0, 4, 10], device=dev, dtype=torch.int32)
        cu_k = torch.tensor([0, 5, 12], device=dev, dtype=torch.int32)
        try:
            o = vl.varlen_attn(q, k, k, cu_q, cu_k, 6, 7)
            info["varlen_attn_gqa_heads"] = f"ok, out {tuple(o.shape)}"
        except Exception as e:
            info["varlen_attn_gqa_heads"] = "error: " + str(e).splitlines()[0][:200]
    except Exception as e:
        info["varlen_attn"] = "missing: " + str(e).splitlines()[0]
    try:
        q = torch.randn(10, 4, 64, device=dev, dtype=torch.bfloat16)
        k = torch.randn(12, 2, 64, device=dev, dtype=torch.bfloat16)
        cu_q = torch.tensor([0, 4, 10], device=dev, dtype=torch.int32)
        cu_k = torch.tensor([0, 5, 12], device=dev, dtype=torch.int32)
        res = torch.ops.aten._flash_attention_forward(q, k, k, cu_q, cu_k, 6, 7, 0.0, True, False)
        info["_flash_attention_forward_gqa"] = f"ok, {len(res)} outputs, out {tuple(res[0].shape)}"
        info["_flash_attention_forward_schema"] = str(torch.ops.aten._flash_attention_forward.default._schema)
    except Exception as e:
        info["_flash_attention_forward_gqa"] = "error: " + str(e).splitlines()[0][:200]
    try:
        from torch.nn.attention.flex_attention import flex_attention

        info["flex_attention"] = str(inspect.signature(flex_attention))
    except Exception as e:
        info["flex_attention"] = "missing: " + str(e)
    try:
        import flash_attn  # noqa: F401

        info["flash_attn"] = flash_attn.__version__
    except Exception as e:
        info["flash_attn"] = "missing: " + str(e).splitlines()[0]
    return info


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--only", default="apis,selector,empty_rows,gqa_mask_memory")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    result = {"env": env()}
    for name, fn in (("apis", apis), ("selector", selector), ("empty_rows", empty_rows),
                     ("gqa_mask_memory", gqa_mask_memory)):
        if name not in args.only.split(","):
            result[name] = []
            continue
        try:
            result[name] = fn(dev)
        except Exception:
            result[name] = {"error": traceback.format_exc()}
    with open(os.path.join(args.out, "probe_kernels.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["env"]))
    print(json.dumps(result.get("apis"), indent=1))
    sel = result["selector"]
    if isinstance(sel, list):
        print("selector (dtype, head_dim, mask, causal, requires_grad): expanded -> gqa")
        for r in sel:
            print(f"  {r['dtype']:15s} d{r['head_dim']:<4d} {r['mask']:5s} causal={r['causal']!s:5s} "
                  f"grad={r['requires_grad']!s:5s} {r['expanded']:20s} -> {r['gqa']}")
    else:
        print(sel)
    print("empty rows (dtype, mask, gqa, kernel): fwd, |dq| of the row")
    for r in result["empty_rows"] if isinstance(result["empty_rows"], list) else []:
        print(f"  {r['dtype']:15s} {r['mask']:16s} gqa={r['gqa']!s:5s} {r['kernel']:9s} "
              f"{r.get('fwd', r.get('error'))} {r.get('dq_row_abs_sum', '')}")
    print("gqa + mask memory/time:", json.dumps(result["gqa_mask_memory"]))


if __name__ == "__main__":
    main()
