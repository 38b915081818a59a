"""Tiny random-weight HF transformers models, built offline from configs (no hub access)."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"pad_token_id": 0}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"head_dim": 16}),
    "starcoder2": (transformers.Starcoder2Config, transformers.Starcoder2ForCausalLM, {}),
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, {}),
}


def build(arch: str, attn: str = "sdpa", **overrides) -> torch.nn.Module:
    cfg_cls, model_cls, extra = ARCHS[arch]
    cfg = cfg_cls(**{**COMMON, **extra, **overrides})
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(cfg).eval()


def batch(length: int, pad: int = 2, batch_size: int = 2, seed: int = 0):
    """Token ids and a left-padded attention mask (row 1 has ``pad`` padding tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def llama_factory():
    """CLI factory used by tests and the README: (model, args, kwargs)."""
    ids, mask = batch(7)
    return build("llama"), (ids,), {"attention_mask": mask}
