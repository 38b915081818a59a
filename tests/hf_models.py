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


# models with sliding-window layers: config and model class names, extra config; layer 0 local, layer 1 global
SLIDING = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),  # every layer local
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", {}),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {}),
}


def build_sliding(arch: str, attn: str = "sdpa", window: int = 4) -> torch.nn.Module | None:
    """A tiny model with ``sliding_window=window``, or None where this transformers has no such class."""
    cfg_name, model_name, extra = SLIDING[arch]
    cfg_cls, model_cls = getattr(transformers, cfg_name, None), getattr(transformers, model_name, None)
    if cfg_cls is None or model_cls is None:
        return None
    layers = {} if arch == "mistral" else {"layer_types": ["sliding_attention", "full_attention"]}
    cfg = cfg_cls(**{**COMMON, **extra, **layers}, sliding_window=window)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(cfg).eval()


def local_layers(model) -> set[int]:
    """The indices of a model's sliding-window layers."""
    types = getattr(model.config, "layer_types", None) or ["sliding_attention"] * model.config.num_hidden_layers
    return {i for i, t in enumerate(types) if t == "sliding_attention"}


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
