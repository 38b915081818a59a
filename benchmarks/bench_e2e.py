"""Whole models through torch.compile: eager, torch.compile and attnfx, each in both compile modes, side by side.

    python benchmarks/bench_e2e.py --out DIR [--scenarios a,b,...] [--variants a,b,...] [--repeats N]
                                   [--budget-s S] [--device cuda|cpu] [--tiny]

The bar ("never slower than torch.compile"): attnfx must not lose to plain torch.compile in the same mode,
measured in the same process. bf16 on CUDA, random weights, one process, every cell fails soft (its error
is recorded and the run goes on). Variants, per scenario:
  eager            the model as is (for generate: ``disable_compile=True``)
  compile_default  ``torch.compile(model, mode="default")``   (generate: ``CompileConfig(mode="default")``)
  compile_ro       ``torch.compile(model, mode="reduce-overhead")``   (generate: HF's default CompileConfig)
  attnfx_default   ``attnfx.optimize(model, mode="default")``
                   (generate: ``CompileConfig(backend="attnfx", mode="default")``)
  attnfx_ro        ``attnfx.optimize(model, mode="reduce-overhead")``
                   (generate: ``CompileConfig(backend="attnfx", mode="reduce-overhead")``)
  bound_gqa_ro     generate only: HF's sdpa path forced to ``enable_gqa`` under reduce-overhead (an upper bound
                   written by hand: no K/V copy per decode step)
Scenarios (real layer dimensions, few layers; ``hunyuan_layer`` and ``prefill`` select their rows together):
  generate_short       HF LlamaForCausalLM, Llama-3-8B layer dims x 4 layers, ``generate`` with a static cache,
                       B=4 left-padded prompts 512/300/200/100, 64 new tokens, greedy -> tokens/s
  generate_long        the same with prompts 16000/12000/8000/4000 -> tokens/s
  prefill_padded       the same model, one forward, B=4 S=2048 left-padded 2048/1500/1024/700, sdpa -> ms/call
  prefill_keep1        the same with ``logits_to_keep=1`` (generate's prefill) -> ms/call
  prefill_eager_attn   the same with ``attn_implementation="eager"`` -> ms/call
  flux                 diffusers FluxTransformer2DModel, real dims, 2 + 4 blocks, 4096 image + 512 text tokens,
                       a 10-step loop (same text, new latents/timestep each step) -> ms/step
  wan                  diffusers WanTransformer3DModel, Wan 2.1 T2V-1.3B dims, 2 blocks, 7800 image + 512 text
                       tokens, a 10-step loop -> ms/step
  hunyuan_layer_step1  one HunyuanImage3 attention layer (examples/hunyuan_image3.py, real config), step 1,
                       B=2, T=1000, N=4096, image rows read -> ms/call
  hunyuan_layer_step2  the same layer at a step >= 2 (1 + N query rows against the cache) -> ms/call
Timing: CUDA-synchronized wall time around whole calls (a whole ``generate``, one forward, one denoising loop),
after warm-up calls (which compile), median over the repeats; ``torch._dynamo.reset()`` and freed memory between
variants. Compiled cells record how many graphs Dynamo compiled (a compiled variant that compiled nothing is an
error), graph breaks and skipped CUDA graphs; attnfx cells record attnfx's report summary. diffusers is imported
only by its scenarios (a clear error when missing). Writes DIR/bench_e2e.json after every cell; the table last
(also on SIGTERM, e.g. from ``timeout``). Ratios: attnfx vs the better of eager and torch.compile in the same mode
(> 1: attnfx is faster).

Time: compiling dominates (each compiled cell compiles its model once). ``--budget-s`` (default 500) skips the
cells that would end past that many seconds (recorded as skipped), so that a run under a 10-minute limit still
ends with its table; ``--budget-s 0`` runs everything. For a complete table under such a limit run the scenarios
in groups, e.g. ``generate_short,generate_long`` / ``prefill`` / ``flux,wan,hunyuan_layer``.

On a host without diffusers and without network, carry its wheel (its other requirements come with
transformers): ``pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux2014_x86_64 -d .whl diffusers==0.42.1`` here, and there
``pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python benchmarks/...``.

``--device cpu --tiny`` runs every scenario and variant at tiny sizes on CPU (float32): a check of the logic.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import gc
import inspect
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
import hunyuan_image3 as hy  # noqa: E402

import attnfx  # noqa: E402

T0 = time.perf_counter()
COMPILE_MODES = {"default": "default", "ro": "reduce-overhead"}
FORWARD_VARIANTS = ["eager", "compile_default", "compile_ro", "attnfx_default", "attnfx_ro"]
GENERATE_VARIANTS = FORWARD_VARIANTS + ["bound_gqa_ro"]
COLUMNS = [("eager", "eager"), ("compile_default", "compile default"), ("compile_ro", "compile reduce-overhead"),
           ("attnfx_default", "attnfx default"), ("attnfx_ro", "attnfx reduce-overhead"),
           ("bound_gqa_ro", "bound: enable_gqa, reduce-overhead")]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:5.0f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- sizes

def sizes(tiny: bool) -> dict:
    """Everything a scenario's size depends on, real or tiny."""
    if not tiny:
        return {
            "llama": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                          num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                          max_position_embeddings=32768),
            "generate_short": dict(lengths=(512, 300, 200, 100), new_tokens=64, repeats=3),
            "generate_long": dict(lengths=(16000, 12000, 8000, 4000), new_tokens=64, repeats=2),
            "prefill": dict(lengths=(2048, 1500, 1024, 700), warmup=2, repeats=10),
            "flux": dict(config=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                     pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                         grid=(64, 64), text=512, batch=1, steps=10, loops=2),
            "wan": dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                    in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                    num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                    rope_max_seq_len=1024),
                        latent=(5, 60, 104), text=512, batch=1, steps=10, loops=2),
            "hunyuan": dict(cfg=hy.Config(), text=1000, image=4096, batch=2, warmup=3, repeats=20),
        }
    return {
        "llama": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=256),
        "generate_short": dict(lengths=(16, 12, 8, 4), new_tokens=4, repeats=2),
        "generate_long": dict(lengths=(40, 30, 20, 10), new_tokens=4, repeats=1),
        "prefill": dict(lengths=(32, 24, 16, 11), warmup=1, repeats=2),
        "flux": dict(config=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
                     grid=(8, 8), text=8, batch=1, steps=3, loops=1),
        "wan": dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64),
                    latent=(2, 8, 8), text=8, batch=1, steps=3, loops=1),
        "hunyuan": dict(cfg=hy.SMALL, text=20, image=64, batch=2, warmup=1, repeats=3),
    }


# --------------------------------------------------------------------------------------------- measuring

def sync(device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    """Seconds of one call, CUDA-synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def free_memory(device) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def reset_compiled_state(device) -> None:
    torch._dynamo.reset()  # also resets the CUDA graph trees
    free_memory(device)


def counters_snapshot() -> dict:
    c = torch._dynamo.utils.counters
    return {"graphs": c["stats"]["unique_graphs"], "graph_breaks": sum(c["graph_break"].values()),
            "cudagraph_skips": c["inductor"]["cudagraph_skips"], "recompiles": c["recompiles"].get("total", 0)}


def counters_since(before: dict) -> dict:
    now = counters_snapshot()
    return {k: now[k] - before[k] for k in now}


def short_error(exc: BaseException) -> dict:
    """``{"error": "<type>: <first line>"}`` of the innermost cause (Dynamo wraps backend errors)."""
    root, seen = exc, {id(exc)}
    while True:
        inner = root.__cause__ or getattr(root, "inner_exception", None)
        if inner is None or id(inner) in seen:
            break
        root = inner
        seen.add(id(inner))
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    out = {"error": f"{type(root).__name__}: {lines[0] if lines else ''}"[:300]}
    if root is not exc:
        outer = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        out["raised_as"] = f"{type(exc).__name__}: {outer[0] if outer else ''}"[:200]
    return out


def site_digest(records) -> list[dict]:
    """The attention sites of a report, grouped by what happened to them."""
    groups: collections.Counter = collections.Counter()
    for r in records:
        mask = r.details.get("mask") or {}
        groups[(tuple(r.applied), r.target or "", mask.get("kind", ""), mask.get("kernel", ""),
                (r.reason or "")[:200])] += 1
    return [{"count": n, "applied": list(a), "target": t, "mask": k, "mask_kernel": mk, "reason": why}
            for (a, t, k, mk, why), n in groups.most_common(8)]


class GlobalReportDelta:
    """The part of ``attnfx.report()`` (process-wide, for ``backend="attnfx"``) one cell added."""

    def __init__(self):
        rep = attnfx.report()
        self.ids = {id(r) for r in rep.sites}
        self.graphs = rep.graphs
        self.cached = len(rep.cached)

    def result(self) -> dict:
        rep = attnfx.report()
        new = [r for r in rep.sites if id(r) not in self.ids]
        saved: dict = {}
        for r in new:
            for k, v in r.savings.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    saved[k] = saved.get(k, 0) + v
        return {"summary": {"sites": len(new), "rewritten": sum(r.rewritten for r in new),
                            "graphs": rep.graphs - self.graphs, "savings": saved,
                            "cached_groups": len(rep.cached) - self.cached},
                "sites": site_digest(new), "report": "attnfx.report() (process-wide), this cell's part"}


def optimized_report(opt) -> dict:
    rep = attnfx.report(opt)
    return {"summary": rep.to_dict()["summary"], "sites": site_digest(rep.sites)}


def peak_extra_mib(fn, device):
    if device != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return round(peak / 2**20, 1)


def max_diff(a, b):
    if a is None or b is None:
        return None
    return float((a.float() - b.float()).abs().nan_to_num(float("inf")).max())


# --------------------------------------------------------------------------------------------- forward workloads

class Workload:
    """A model and one measured unit of work (one forward, or one whole denoising loop)."""

    unit = "ms/call"
    per = 1  # calls per unit (steps of a loop)
    warmup = 1
    repeats = 5

    def __init__(self, model):
        self.model = model

    def run(self, fn):  # -> a small tensor summarising the result (compared against eager)
        raise NotImplementedError

    def reset(self) -> None:  # before each variant: the same inputs in the same order
        pass

    def setup(self) -> dict:
        return {}


def mark_step() -> None:
    """A new iteration for CUDA graph trees (reduce-overhead); a no-op otherwise."""
    torch.compiler.cudagraph_mark_step_begin()


def padded_batch(lengths, vocab, device, gen_seed=0):
    """Left-padded random prompts: input_ids (pad 0), attention_mask, position_ids as generate computes them."""
    s = max(lengths)
    g = torch.Generator().manual_seed(gen_seed)
    ids = torch.randint(1, vocab, (len(lengths), s), generator=g)
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, s - n:] = 1
    ids = ids * mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


class Prefill(Workload):
    def __init__(self, model, size, device, keep1):
        super().__init__(model)
        self.ids, self.mask, self.pos = padded_batch(size["lengths"], model.config.vocab_size, device)
        self.kwargs = {"logits_to_keep": 1} if keep1 else {}
        self.warmup, self.repeats = size["warmup"], size["repeats"]
        self.lengths = size["lengths"]

    def run(self, fn):
        mark_step()
        out = fn(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=False, **self.kwargs)
        return out.logits[:, -1].float().clone()

    def setup(self):
        return {"batch": len(self.lengths), "seq": max(self.lengths), "lengths": list(self.lengths), "padding": "left",
                "attn_implementation": self.model.config._attn_implementation, "use_cache": False, **self.kwargs}


class DenoiseLoop(Workload):
    unit = "ms/step"

    def __init__(self, model, size, call, make_latents, timesteps, step_scale):
        super().__init__(model)
        self.call, self.timesteps, self.step_scale = call, timesteps, step_scale
        self.start = make_latents()  # every loop starts from the same noise (made once, outside the timing)
        self.per = len(timesteps)
        self.warmup, self.repeats = 1, size["loops"]

    def run(self, fn):
        latents = self.start
        ts = self.timesteps + [0.0]
        for i, t in enumerate(self.timesteps):
            mark_step()
            noise = self.call(fn, latents, t)
            latents = latents + (ts[i + 1] - t) * self.step_scale * noise  # an Euler step of the flow
        return latents.float()


def import_diffusers():
    """diffusers, imported only by the scenarios that need it."""
    try:
        import diffusers
    except ImportError as e:
        raise RuntimeError(f"diffusers is not installed ({e}); carry its wheel (see the docstring)") from None
    return diffusers


def keep_in_fp32(model) -> int:
    """What ``from_pretrained(torch_dtype=...)`` keeps in float32 (the model's ``_keep_in_fp32_modules``: Wan's
    rope, time embedder, norms, scale-shift tables), after ``.to(dtype)`` cast everything; returns how many tensors."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    n = 0
    for module_name, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or not t.is_floating_point() or t.dtype == torch.float32:
                    continue
                if keep & set(f"{module_name}.{name}".split(".")):
                    if isinstance(t, torch.nn.Parameter):
                        t.data = t.data.float()
                    else:
                        store[name] = t.float()
                    n += 1
    return n


def build_flux(size, device, dtype):
    diffusers = import_diffusers()
    FluxTransformer2DModel = diffusers.FluxTransformer2DModel
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**size["config"]).to(dtype).eval()
    kept = keep_in_fp32(model)
    cfg = size["config"]
    b, (h, w), t = size["batch"], size["grid"], size["text"]
    g = torch.Generator().manual_seed(1)
    txt = torch.randn(b, t, cfg["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(b, cfg["pooled_projection_dim"], generator=g).to(device, dtype)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.reshape(h * w, 3).to(device, dtype)
    txt_ids = torch.zeros(t, 3, device=device, dtype=dtype)
    guidance = torch.full((b,), 3.5, device=device, dtype=torch.float32)  # Flux-dev is guidance-distilled

    def make_latents():
        return torch.randn(b, h * w, cfg["in_channels"], generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def call(fn, latents, sigma):
        timestep = torch.full((b,), sigma, device=device, dtype=dtype)  # the pipeline passes t / 1000
        return fn(hidden_states=latents, encoder_hidden_states=txt, pooled_projections=pooled, timestep=timestep,
                  img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]

    steps = size["steps"]
    loop = DenoiseLoop(model, size, call, make_latents, [1.0 - i / steps for i in range(steps)], 1.0)
    loop.setup = lambda: {"diffusers": diffusers.__version__, "config": cfg, "batch": b, "image_tokens": h * w,
                          "text_tokens": t, "steps": steps, "guidance": 3.5, "kept_in_float32": kept}
    return loop


def build_wan(size, device, dtype):
    diffusers = import_diffusers()
    WanTransformer3DModel = diffusers.WanTransformer3DModel
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**size["config"]).to(dtype).eval()
    kept = keep_in_fp32(model)
    cfg = size["config"]
    b, (f, h, w), t = size["batch"], size["latent"], size["text"]
    g = torch.Generator().manual_seed(1)
    txt = torch.randn(b, t, cfg["text_dim"], generator=g).to(device, dtype)
    p = cfg["patch_size"]
    tokens = (f // p[0]) * (h // p[1]) * (w // p[2])

    def make_latents():
        return torch.randn(b, cfg["in_channels"], f, h, w, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def call(fn, latents, t_):
        timestep = torch.full((b,), int(t_), device=device, dtype=torch.long)  # scheduler timesteps in [0, 1000)
        return fn(hidden_states=latents, timestep=timestep, encoder_hidden_states=txt, return_dict=False)[0]

    steps = size["steps"]
    loop = DenoiseLoop(model, size, call, make_latents, [999.0 * (1 - i / steps) for i in range(steps)], 1e-3)
    loop.setup = lambda: {"diffusers": diffusers.__version__, "config": cfg, "batch": b,
                          "latent": [cfg["in_channels"], f, h, w], "image_tokens": tokens, "text_tokens": t,
                          "steps": steps, "kept_in_float32": kept}
    return loop


class HunyuanLayer(Workload):
    def __init__(self, size, device, dtype, step):
        cfg, t, n, b = size["cfg"], size["text"], size["image"], size["batch"]
        attn = hy.make(cfg, t, n, batch=b, device=device, dtype=dtype)
        s = t + n + 2
        if step == 1:
            model = hy.ImageRows(attn, t, n)
            self.args = [hy.step1_mask(t, n, b, device), torch.arange(s, device=device), s]
            rows = s
        else:
            model = LaterSteps(attn)
            self.args = [hy.later_steps_mask(t, n, b, device), torch.arange(t, t + 1 + n, device=device), s]
            rows = 1 + n
        super().__init__(model)
        g = torch.Generator().manual_seed(0)
        self.xs = [torch.randn(b, rows, cfg.hidden, generator=g).to(device, dtype) for _ in range(3)]
        self.i = 0
        self.warmup, self.repeats = size["warmup"], size["repeats"]
        self.info = {"step": step, "batch": b, "T": t, "N": n, "S": s, "query_rows": rows, "hidden": cfg.hidden,
                     "heads": cfg.heads, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
                     "output": "image rows (slice)" if step == 1 else "x[:, 1:]"}

    def reset(self):
        self.i = 0

    def run(self, fn):
        x = self.xs[self.i % len(self.xs)]  # rotating inputs, the same mask tensor (as the pipeline)
        self.i += 1
        mark_step()
        return fn(x, *self.args)[:, -1].float().clone()

    def setup(self):
        return self.info


class LaterSteps(torch.nn.Module):
    """HunyuanImage3 steps >= 2 as the pipeline reads them: ``x[:, 1:]`` (the image rows)."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, hidden_states, attention_mask, cache_position, kv_len: int):
        return self.attn(hidden_states, attention_mask, cache_position, kv_len)[:, 1:]


def wrap(model, variant):
    """The callable a forward variant runs, and the attnfx-optimized module (for its report)."""
    if variant == "eager":
        return model, None
    kind, mode = variant.split("_", 1)
    if kind == "compile":
        return torch.compile(model, mode=COMPILE_MODES[mode]), None
    opt = attnfx.optimize(model, mode=COMPILE_MODES[mode])
    return opt, opt


def forward_cell(work: Workload, variant, device, ref):
    res: dict = {}
    before = counters_snapshot()
    fn, opt = wrap(work.model, variant)
    work.reset()
    with torch.no_grad():
        t_first = [timed(lambda: work.run(fn), device) for _ in range(work.warmup)]  # the first one compiles
        out = work.run(fn)
        res["first_call_s"] = round(t_first[0], 2)
        times = [timed(lambda: work.run(fn), device) for _ in range(work.repeats)]
        res["peak_extra_mib"] = peak_extra_mib(lambda: work.run(fn), device)
    ms = [1e3 * t / work.per for t in times]
    res.update({"value": round(statistics.median(ms), 3), "times": [round(t, 3) for t in ms],
                "max_diff_vs_eager": max_diff(out, ref) if variant != "eager" else 0.0})
    c = counters_since(before)
    res["dynamo"] = c
    if variant != "eager" and c["graphs"] == 0:
        raise RuntimeError(f"{variant} compiled no graph")
    if opt is not None:
        res["attnfx"] = optimized_report(opt)
    return res, out


# --------------------------------------------------------------------------------------------- generate

def compile_config_cls():
    try:
        from transformers import CompileConfig
    except ImportError:
        from transformers.generation import CompileConfig
    return CompileConfig


@contextlib.contextmanager
def forced_gqa(record: dict):
    """HF's sdpa path with ``enable_gqa`` forced: the env var where the installed transformers reads it, otherwise
    the decision function patched; both undone afterwards."""
    from transformers.integrations import sdpa_attention as sa

    decide = getattr(sa, "use_gqa_in_sdpa", None)
    source = inspect.getsource(sa)
    old_env = os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    patched = False
    if "TRANSFORMERS_SDPA_FORCE_GQA" in source:
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
        record["force_gqa_via"] = "env TRANSFORMERS_SDPA_FORCE_GQA=1"
    elif decide is not None:
        sa.use_gqa_in_sdpa = lambda *a, **k: True
        patched = True
        record["force_gqa_via"] = "transformers.integrations.sdpa_attention.use_gqa_in_sdpa patched to True"
    else:
        raise RuntimeError("this transformers has neither TRANSFORMERS_SDPA_FORCE_GQA nor use_gqa_in_sdpa")
    try:
        probe = torch.zeros(1, 1, 1, 1)
        params = list(inspect.signature(sa.use_gqa_in_sdpa).parameters)
        args = {"attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool), "key": probe, "value": probe}
        record["force_gqa_effective"] = bool(sa.use_gqa_in_sdpa(*[args.get(p, probe) for p in params]))
        if not record["force_gqa_effective"]:
            raise RuntimeError("use_gqa_in_sdpa still says no with a mask")
        yield
    finally:
        if patched:
            sa.use_gqa_in_sdpa = decide
        if old_env is None:
            os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
        else:
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = old_env


def forget_compiled_generate(model) -> None:
    for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
        model.__dict__.pop(attr, None)


def generate_cell(model, batch, size, variant, device, ref_tokens):
    ids, mask = batch
    new = size["new_tokens"]
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
    res: dict = {}
    if variant == "eager":
        kwargs["disable_compile"] = True
    else:
        CompileConfig = compile_config_cls()
        mode = COMPILE_MODES[variant.rsplit("_", 1)[1]]
        cc = CompileConfig(backend="attnfx", mode=mode) if variant.startswith("attnfx") else CompileConfig(mode=mode)
        if device != "cuda":
            cc._compile_all_devices = True  # HF compiles only on accelerators unless told (tiny CPU check)
        kwargs["compile_config"] = cc
        res["compile_config"] = {k: str(v) for k, v in cc.to_dict().items()}
        res["hf_default_compile_mode"] = CompileConfig().mode
    forget_compiled_generate(model)
    before = counters_snapshot()
    delta = GlobalReportDelta() if variant.startswith("attnfx") else None
    ctx = forced_gqa(res) if variant == "bound_gqa_ro" else contextlib.nullcontext()
    with ctx:
        out = None
        res["first_call_s"] = round(timed(lambda: model.generate(**kwargs), device), 2)
        times = []
        outs: list = []
        for _ in range(size["repeats"]):
            times.append(timed(lambda: outs.append(model.generate(**kwargs)), device))
        out = outs[-1]
        del outs[:-1]
    c = counters_since(before)
    res["dynamo"] = c
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, not {new}")
    compiled = hasattr(model, "_compiled_call") and c["graphs"] > 0
    res["compiled_decode"] = compiled
    if variant == "eager" and (c["graphs"] or hasattr(model, "_compiled_call")):
        raise RuntimeError("the eager variant compiled")
    if variant != "eager":
        if not compiled:
            raise RuntimeError(f"{variant}: generate did not compile the decode step")
        res["compile_config_used"] = {k: str(v) for k, v in model._last_compile_config.to_dict().items()}
    b = ids.shape[0]
    med = statistics.median(times)
    gen = out[:, ids.shape[1]:]
    res.update({"value": round(b * new / med, 1), "generate_s": [round(t, 3) for t in times],
                "tokens_equal_to_eager": None if ref_tokens is None else
                round(float((gen == ref_tokens).float().mean()), 4)})
    if delta is not None:
        res["attnfx"] = delta.result()
    forget_compiled_generate(model)
    return res, gen


# --------------------------------------------------------------------------------------------- scenarios

class Llama:
    """One random-weight LlamaForCausalLM shared by the generate and prefill scenarios."""

    model = None

    @classmethod
    def get(cls, size, device, dtype):
        if cls.model is None:
            from transformers import LlamaConfig, LlamaForCausalLM

            cfg = LlamaConfig(**size["llama"], pad_token_id=0, bos_token_id=None, eos_token_id=None,
                              tie_word_embeddings=False)
            cfg._attn_implementation = "sdpa"
            torch.manual_seed(0)
            with torch.device(device):
                model = LlamaForCausalLM(cfg).to(dtype).eval()
            model.generation_config.eos_token_id = None
            model.generation_config.pad_token_id = 0
            cls.model = model
        return cls.model

    @classmethod
    def drop(cls, device):
        cls.model = None
        free_memory(device)


def set_attn(model, impl):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
    if model.config._attn_implementation != impl:
        raise RuntimeError(f"attention implementation is {model.config._attn_implementation}, not {impl}")


def llama_setup(model) -> dict:
    c = model.config
    return {"model": "LlamaForCausalLM (random weights)", "layers": c.num_hidden_layers, "hidden": c.hidden_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "intermediate": c.intermediate_size,
            "vocab": c.vocab_size, "rope": str(getattr(c, "rope_parameters", None) or getattr(c, "rope_theta", None)),
            "max_position_embeddings": c.max_position_embeddings}


def scenario_generate(name, ctx):
    size = ctx.sizes[name]
    model = Llama.get(ctx.sizes, ctx.device, ctx.dtype)
    set_attn(model, "sdpa")
    ids, mask, _ = padded_batch(size["lengths"], model.config.vocab_size, ctx.device)
    ctx.setup(name, "tok/s", True, {**llama_setup(model), "batch": len(size["lengths"]),
                                     "prompt_lengths": list(size["lengths"]), "padding": "left",
                                     "new_tokens": size["new_tokens"], "cache": "static", "greedy": True,
                                     "repeats": size["repeats"]})
    ref = None
    for variant in ctx.variants(GENERATE_VARIANTS):
        out = ctx.cell(name, variant,
                       lambda v=variant, r=ref: generate_cell(model, (ids, mask), size, v, ctx.device, r))
        if variant == "eager" and out is not None:
            ref = out


def scenario_forward(name, ctx, build, unit_hint=None):
    try:
        work = build()
    except Exception as e:
        traceback.print_exc()
        ctx.setup(name, unit_hint or "ms/call", False, {})
        for variant in ctx.variants(FORWARD_VARIANTS):
            ctx.record(name, variant, {**short_error(e), "failed_in": "building the model"})
        return
    ctx.setup(name, work.unit, False, {**work.setup(), "warmup": work.warmup, "repeats": work.repeats})
    ref = None
    for variant in ctx.variants(FORWARD_VARIANTS):
        out = ctx.cell(name, variant, lambda v=variant, r=ref: forward_cell(work, v, ctx.device, r))
        if variant == "eager" and out is not None:
            ref = out


def scenario_prefill(name, ctx):
    model = Llama.get(ctx.sizes, ctx.device, ctx.dtype)
    set_attn(model, "eager" if name == "prefill_eager_attn" else "sdpa")
    try:
        def build():
            w = Prefill(model, ctx.sizes["prefill"], ctx.device, keep1=name == "prefill_keep1")
            info = w.setup()
            w.setup = lambda: {**llama_setup(model), **info}
            return w
        scenario_forward(name, ctx, build)
    finally:
        set_attn(model, "sdpa")


SCENARIOS = {
    "generate_short": scenario_generate,
    "generate_long": scenario_generate,
    "prefill_padded": scenario_prefill,
    "prefill_keep1": scenario_prefill,
    "prefill_eager_attn": scenario_prefill,
    "flux": lambda name, ctx: scenario_forward(name, ctx, lambda: build_flux(ctx.sizes["flux"], ctx.device, ctx.dtype),
                                               "ms/step"),
    "wan": lambda name, ctx: scenario_forward(name, ctx, lambda: build_wan(ctx.sizes["wan"], ctx.device, ctx.dtype),
                                              "ms/step"),
    "hunyuan_layer_step1": lambda name, ctx: scenario_forward(
        name, ctx, lambda: HunyuanLayer(ctx.sizes["hunyuan"], ctx.device, ctx.dtype, 1)),
    "hunyuan_layer_step2": lambda name, ctx: scenario_forward(
        name, ctx, lambda: HunyuanLayer(ctx.sizes["hunyuan"], ctx.device, ctx.dtype, 2)),
}
GROUPS = {"prefill": ["prefill_padded", "prefill_keep1", "prefill_eager_attn"],
          "hunyuan_layer": ["hunyuan_layer_step1", "hunyuan_layer_step2"]}


class Context:
    def __init__(self, args, env):
        self.args, self.env = args, env
        self.device = args.device
        self.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        self.sizes = sizes(args.tiny)
        if args.repeats:
            for s in self.sizes.values():
                for key in ("repeats", "loops"):
                    if isinstance(s, dict) and key in s:
                        s[key] = args.repeats
        self.wanted = args.variants.split(",") if args.variants else None
        self.results: dict = {}
        self.path = os.path.join(args.out, "bench_e2e.json")

    def variants(self, available):
        return [v for v in available if self.wanted is None or v in self.wanted]

    def setup(self, name, unit, higher_is_better, setup):
        self.results[name] = {"unit": unit, "higher_is_better": higher_is_better, "setup": setup, "cells": {}}
        self.save()

    def record(self, name, variant, res):
        self.results[name]["cells"][variant] = res
        self.save()

    def cell(self, name, variant, fn):
        """Run one (scenario, variant) cell; record its result or its error; return its output or None."""
        elapsed = time.perf_counter() - T0
        done = [c["cell_s"] for v, c in self.results[name]["cells"].items() if v != "eager" and "cell_s" in c]
        guess = max(done) if done else (45.0 if self.device == "cuda" else 10.0)  # a compiled cell's duration
        if self.args.budget_s and elapsed + (guess if variant != "eager" else 5.0) > self.args.budget_s:
            log(f"{name} / {variant}: skipped (would end past the time budget of {self.args.budget_s:.0f}s)")
            self.record(name, variant, {"skipped": f"time budget of {self.args.budget_s:.0f}s"})
            return None
        log(f"{name} / {variant}: start")
        out = None
        try:
            res, out = fn()
        except Exception as e:
            if self.args.debug:
                traceback.print_exc()
            res = short_error(e)
            if variant.startswith("attnfx") and "mode" in res["error"]:
                res["pending"] = "attnfx does not accept mode= yet"
        res["cell_s"] = round(time.perf_counter() - T0 - elapsed, 1)
        self.record(name, variant, res)
        if "error" in res:
            log(f"{name} / {variant}: ERROR {res['error']}")
        else:
            log(f"{name} / {variant}: {res['value']} {self.results[name]['unit']} (cell {res['cell_s']}s, first call "
                f"{res.get('first_call_s')}s, graphs {res['dynamo']['graphs']}, breaks {res['dynamo']['graph_breaks']},"
                f" cudagraph skips {res['dynamo']['cudagraph_skips']})")
        reset_compiled_state(self.device)
        return out

    def save(self):
        for r in self.results.values():
            r["ratios"] = ratios(r)
        with open(self.path, "w") as f:
            json.dump({"env": self.env, "args": vars(self.args), "scenarios": self.results}, f, indent=1,
                      default=str)


def ratios(r) -> dict:
    """attnfx vs the better of eager and torch.compile in the same mode (> 1: attnfx is faster)."""
    cells, out = r["cells"], {}
    val = {v: c.get("value") for v, c in cells.items()}
    for mode in COMPILE_MODES:
        a, e, c = val.get(f"attnfx_{mode}"), val.get("eager"), val.get(f"compile_{mode}")
        rivals = [x for x in (e, c) if x]
        if not a or not rivals:
            out[mode] = None
        elif r["higher_is_better"]:
            out[mode] = round(a / max(rivals), 3)
        else:
            out[mode] = round(min(rivals) / a, 3)
    return out


def table(results) -> str:
    head = ["scenario", "unit"] + [label for _, label in COLUMNS] + ["attnfx vs best, default",
                                                                       "attnfx vs best, reduce-overhead"]
    rows = [head, ["---"] * len(head)]
    for name, r in results.items():
        row = [name, r["unit"]]
        for v, _ in COLUMNS:
            c = r["cells"].get(v)
            row.append("-" if c is None else "error" if "error" in c else "skip" if "skipped" in c
                       else f"{c['value']:.1f}" if r["higher_is_better"] else f"{c['value']:.3f}")
        for mode in COMPILE_MODES:
            x = r["ratios"].get(mode)
            row.append("-" if x is None else f"{x:.2f}x" + (" (slower)" if x < 1 else ""))
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def environment(args) -> dict:
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "attnfx": attnfx.__version__, "attnfx_path": os.path.dirname(attnfx.__file__),
           "device": "cpu", "tiny": args.tiny}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if args.device == "cuda":
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    try:
        env["attnfx_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        env["attnfx_commit"] = None
    return env


def ensure_backend_registered() -> None:
    """``backend="attnfx"`` comes from the package's entry point; register it by hand when attnfx is not
    installed (run from a checkout)."""
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    try:
        lookup_backend("attnfx")
    except Exception:
        register_backend(attnfx.attnfx_backend, name="attnfx")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, of {', '.join(SCENARIOS)}; groups: {', '.join(GROUPS)}")
    p.add_argument("--variants", default="", help=f"comma-separated subset of {', '.join(GENERATE_VARIANTS)}")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats (loops for flux/wan) for every scenario")
    p.add_argument("--budget-s", type=float, default=500.0,
                   help="cells that would start after this many seconds are skipped (0: no limit)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a check of the logic, e.g. on CPU)")
    p.add_argument("--debug", action="store_true", help="print each failing cell's traceback")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device (use --device cpu --tiny for a check of the logic)")
    unknown = set(filter(None, args.variants.split(","))) - set(GENERATE_VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {', '.join(sorted(unknown))}")
    names = []
    for n in args.scenarios.split(","):
        for m in GROUPS.get(n, [n]):
            if m not in SCENARIOS:
                p.error(f"unknown scenario {m!r}")
            names.append(m)
    os.makedirs(args.out, exist_ok=True)
    ensure_backend_registered()
    env = environment(args)
    log(f"{env}")
    ctx = Context(args, env)

    def terminated(signum, frame):  # killed at a time limit: the table of what was measured
        log(f"signal {signum}: stopping; partial results in {ctx.path}")
        print(table(ctx.results), flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    llama = ("generate", "prefill")
    for i, name in enumerate(names):
        log(f"== {name}")
        try:
            SCENARIOS[name](name, ctx)
        except Exception as e:  # the scenario's setup failed (e.g. building the model): its cells say why
            traceback.print_exc()
            err = short_error(e)
            if name not in ctx.results:
                ctx.setup(name, "tok/s" if name.startswith("generate") else "ms/call", name.startswith("generate"), {})
            cells = ctx.results[name]["cells"]
            for variant in ctx.variants(GENERATE_VARIANTS if name.startswith("generate") else FORWARD_VARIANTS):
                cells.setdefault(variant, {**err, "failed_in": "the scenario's setup"})
            ctx.save()
        if not (i + 1 < len(names) and names[i + 1].startswith(llama)):
            Llama.drop(ctx.device)
        reset_compiled_state(ctx.device)
    log(f"done; results in {ctx.path}")
    print(f"\n{env}\n")
    print(table(ctx.results), flush=True)


if __name__ == "__main__":
    main()
