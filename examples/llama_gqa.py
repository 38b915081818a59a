"""Optimize a (tiny, random-weight) HF Llama with attnfx and print what it did.

    python examples/llama_gqa.py                 # eager attention: manual_attention + gqa
    python examples/llama_gqa.py --attn sdpa     # SDPA attention: gqa
    attnfx report examples/llama_gqa.py:make     # the same through the CLI

The model is built from a config in code (no download). Its attention is written the slow way, as
HF writes it under torch.compile: K/V heads copied by ``repeat_kv`` and a materialized mask. attnfx
rewrites every layer to SDPA reading the un-copied K/V (``enable_gqa=True``); ``verify=True`` runs
the original alongside on the first call and checks every rewritten site.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import transformers

import attnfx


def make(attn: str = "eager", layers: int = 4, length: int = 32):
    """(model, args, kwargs): a Llama with 8 query heads sharing 2 K/V heads, a left-padded batch of 2."""
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 256, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, : length // 4] = 0  # left padding
    return model, (ids,), {"attention_mask": mask}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, inputs, kwargs = make(args.attn)
    opt = attnfx.optimize(model, compiler=args.compiler, verify=True)
    with torch.no_grad():
        start = time.perf_counter()
        actual = opt(*inputs, **kwargs).logits
        print(f"first call (rewrite + compile + verify): {time.perf_counter() - start:.1f}s")
        expected = model(*inputs, **kwargs).logits
    print(f"max |optimized - original| logits: {(actual - expected).abs().max().item():.2e}\n")
    print(attnfx.report(opt))


if __name__ == "__main__":
    main()
