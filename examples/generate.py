"""Text generation through attnfx: a (tiny, random-weight) HF Llama, two ways.

    python examples/generate.py                      # optimize(model).generate(...): every forward optimized
    python examples/generate.py --static-cache       # transformers' own compiled decoding, backend="attnfx"

``attnfx.optimize(model).generate(...)`` runs transformers' ``generate`` with each forward call it makes
(prefill and every decoding step) going through the attnfx-compiled forward. With a static KV cache,
transformers compiles the decoding step itself; ``CompileConfig(backend=attnfx.Backend(...))`` makes that
compile go through attnfx (``mode="reduce-overhead"`` adds CUDA graphs on a GPU).
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import attnfx


def make(layers: int = 2, seed: int = 0):
    """A Llama with 8 query heads sharing 2 K/V heads, and a left-padded batch of two prompts."""
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # the second prompt is 7 tokens long, left-padded
    return model, ids, mask


def generate(static_cache: bool = False, new_tokens: int = 8, compiler: str = "eager"):
    """(attnfx's tokens, the original's tokens, the report)."""
    model, ids, mask = make()
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        expected = model.generate(ids, **kw)
        if static_cache:
            backend = attnfx.Backend(compiler=compiler)
            config = transformers.CompileConfig(backend=backend, mode="default", fullgraph=False)
            config._compile_all_devices = model.device.type == "cpu"  # transformers compiles on GPUs unless told
            actual = model.generate(ids, cache_implementation="static", compile_config=config, **kw)
            report = attnfx.report(backend)
        else:
            opt = attnfx.optimize(model, compiler=compiler)
            actual = opt.generate(ids, **kw)
            report = attnfx.report(opt)
    return actual, expected, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--static-cache", action="store_true", help="transformers' compiled decoding, backend attnfx")
    p.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    args = p.parse_args()
    start = time.perf_counter()
    actual, expected, report = generate(args.static_cache, compiler=args.compiler)
    print(f"generated {actual.shape[1] - 12} tokens per prompt in {time.perf_counter() - start:.1f}s "
          f"(compiles included); equal to the original's: {torch.equal(actual, expected)}\n")
    print(report)


if __name__ == "__main__":
    main()
