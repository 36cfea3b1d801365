"""The one place that knows transformers' decoder internals: which model types are Llama-style (the server's
decode loop and the fast training backend read their modules directly), where the decoder layers, rotary
embedding and head live, the head size, and which architectures' logits are a plain projection of the last
hidden state. A new transformers release or a new family changes this file, not serve/ or train/."""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn

# decoder families whose layers are (input norm, self_attn q/k/v/o, post norm, SwiGLU mlp) with rotary embedding
LLAMA_LIKE = ("llama", "mistral", "qwen2")
# causal LMs whose logits are exactly `lm_head(decoder(x).last_hidden_state)`: no scaling or soft-capping after the
# head, so the loss may compute logits only at positions that predict a target token
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3", "starcoder2"})


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers of a *ForCausalLM (model.model.layers)."""
    return model.model.layers


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary(model: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for `position_ids` (b, s) from the model's own rotary embedding (its scaling included)."""
    return model.model.rotary_emb(x, position_ids=position_ids)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' Llama rotary application (the same op the model's attention runs)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def has_qk_norm(model: nn.Module) -> bool:
    return hasattr(decoder_layers(model)[0].self_attn, "q_norm")


def body_and_head(model: nn.Module):
    """(decoder, head) when the logits can be computed on a subset of positions, else None."""
    if model_type(model) not in PLAIN_HEAD or not hasattr(model, "get_output_embeddings"):
        return None
    body, head = getattr(model, getattr(model, "base_model_prefix", ""), None), model.get_output_embeddings()
    if body is None or body is model or head is None:
        return None
    return body, head


@functools.lru_cache(maxsize=None)
def cache_keyword(module_type: type) -> str:
    """The keyword a model or decoder class takes its key/value cache by, which is also the name of the output
    field that returns it: transformers renamed `past_key_values` to `cache` (the old name warns, then goes)."""
    return "cache" if "cache" in inspect.signature(module_type.forward).parameters else "past_key_values"
