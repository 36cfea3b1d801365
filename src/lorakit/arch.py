"""THE model description: what each decoder family does (facts as data) and where its parts live (accessors).

The only module that reads transformers' decoder internals. The server's decoder step (serve/forward.py), its
scoring (serve/score.py), the fast training backend (train/fast) and the shared-prefix forward (train/prefix.py)
ask it, and they ask by fact ("does attention normalise q and k?", "which layers attend through a window?"), not
by family name, so a new transformers release or a new family changes this file, not serve/ or train/.

A family's facts (`Family`, one per model type in FAMILIES; per-model values such as the window come from the
model's config through the accessors below):
  norm_offset   RMSNorm scale: w (0.0) or 1 + w (1.0, Gemma); the model's own norm modules apply it
  sandwich      a norm after attention and after the MLP too, four a layer (Gemma 2 and 3)
  rope          "full": rotate-half over the whole head; "partial": over partial_rotary_factor of it (Phi-3);
                "per-layer-type": sliding and full layers rotate with their own base frequency (Gemma 3).
                RoPE scaling (linear, llama3, yarn, longrope) is the model's rotary module's; "dynamic" is refused
                by the server (its frequencies depend on what the module computed before)
  qk_norm       an RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
  attn_softcap  attention scores tanh-capped at config.attn_logit_softcapping (Gemma 2)
  final_softcap logits tanh-capped at config.final_logit_softcapping where it is set (Gemma 2 and 3)
  windows       "none"; "all": config.sliding_window on every layer (Mistral, Phi-3); "layer-types": on the
                layers config.layer_types marks sliding (Qwen2/3 above max_window_layers, Gemma 2 every other
                layer, Gemma 3 five of six)
  qkv, gate_up  the projection modules: three and two, or one fused module each (Phi-3's qkv_proj, gate_up_proj);
                a fused module's output is q|k|v (sizes `qkv_sizes`) and gate|up
  act           the MLP's gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma); the model's MLP applies it
  embed_scale   embeddings times sqrt(hidden_size) (Gemma; the model's embedding module applies it)
  tied_head     "config": the head shares the embedding where tie_word_embeddings says; "always" (Gemma)
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Family:
    name: str
    norm_offset: float = 0.0
    sandwich: bool = False
    rope: str = "full"
    qk_norm: bool = False
    attn_softcap: bool = False
    final_softcap: bool = False
    windows: str = "none"
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    act: str = "silu"
    embed_scale: bool = False
    tied_head: str = "config"

    @property
    def plain_decoder(self) -> bool:
        """Each layer is exactly: RMSNorm, attention over separate q/k/v with full rotate-half RoPE and no q/k norm,
        residual, RMSNorm, SwiGLU over separate gate/up, residual; plain embeddings (windows are per model)."""
        return (self.norm_offset == 0.0 and not self.sandwich and self.rope == "full" and not self.qk_norm
                and not self.attn_softcap and not self.final_softcap and len(self.qkv) == 3
                and len(self.gate_up) == 2 and self.act == "silu" and not self.embed_scale)


_GEMMA = dict(norm_offset=1.0, sandwich=True, act="gelu_tanh", embed_scale=True, tied_head="always",
              windows="layer-types", final_softcap=True)
# transformers model_type -> its family (Gemma 3's text-only causal LM is "gemma3_text")
FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),
    "mistral": Family("mistral", windows="all"),
    "qwen2": Family("qwen2", windows="layer-types"),
    "qwen3": Family("qwen3", qk_norm=True, windows="layer-types"),
    "gemma2": Family("gemma2", attn_softcap=True, **_GEMMA),
    "gemma3_text": Family("gemma3", rope="per-layer-type", qk_norm=True, **_GEMMA),
    "phi3": Family("phi3", rope="partial", windows="all", qkv=("qkv_proj",), gate_up=("gate_up_proj",)),
}
SUPPORTED = tuple(FAMILIES)  # the model types the server runs
# the model types whose layers are plain Llama-style decoder layers (Family.plain_decoder)
LLAMA_LIKE = tuple(t for t, f in FAMILIES.items() if f.plain_decoder)
# causal LMs whose logits are exactly `head(decoder(x).last_hidden_state)`: the described families without
# soft-capped logits and other transformers causal LMs known to have a plain head. The loss may then compute
# logits only at positions that predict a target token.
PLAIN_HEAD = frozenset({t for t, f in FAMILIES.items() if not f.final_softcap}
                       | {"olmo", "olmo2", "smollm3", "starcoder2"})


# ---------------------------------------------------------------- the family and its per-model facts
def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def family(model: nn.Module, needed_by: str = "lorakit") -> Family:
    """The model's family; a ValueError naming its model type and the described ones if it has none (`needed_by`
    says which path needed it)."""
    kind = model_type(model)
    fam = FAMILIES.get(kind)
    if fam is None:
        raise ValueError(f"{needed_by} runs the model types {', '.join(SUPPORTED)}; this model's model_type is "
                         f"{kind!r}")
    return fam


def windows(model: nn.Module) -> list[int | None]:
    """Per decoder layer, its sliding attention window (a query at position p sees keys p - window + 1 .. p), or
    None where it attends to every earlier position."""
    cfg = model.config
    fam = FAMILIES.get(model_type(model))
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False or fam is None or fam.windows == "none":
        return [None] * cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if fam.windows == "layer-types" and types:
        return [window if t == "sliding_attention" else None for t in types[:cfg.num_hidden_layers]]
    return [window] * cfg.num_hidden_layers


def attn_softcap(model: nn.Module) -> float | None:
    """c where attention scores are c * tanh(scores / c) before the mask and softmax, else None."""
    fam = FAMILIES.get(model_type(model))
    return getattr(model.config, "attn_logit_softcapping", None) if fam and fam.attn_softcap else None


def final_softcap(model: nn.Module) -> float | None:
    """c where the logits are c * tanh(head(h) / c), else None."""
    fam = FAMILIES.get(model_type(model))
    return getattr(model.config, "final_logit_softcapping", None) if fam and fam.final_softcap else None


def rope_type(model: nn.Module) -> str:
    """The RoPE scaling type of the model's rotary module ("default", "linear", "llama3", "yarn", "longrope",
    "dynamic", ...)."""
    module = decoder(model).rotary_emb
    kind = getattr(module, "rope_type", "default")
    return next(iter(set(kind.values())), "default") if isinstance(kind, dict) else kind


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def qkv_sizes(config) -> tuple[int, int, int]:
    """Output features of q, k and v (the split of a fused qkv projection)."""
    d = head_dim(config)
    return config.num_attention_heads * d, config.num_key_value_heads * d, config.num_key_value_heads * d


# ---------------------------------------------------------------- where the parts live
def decoder(model: nn.Module) -> nn.Module:
    """The decoder body of a *ForCausalLM (embedding, layers, rotary embedding, final norm; no head)."""
    return model.model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers of a *ForCausalLM."""
    return decoder(model).layers


def layer_path(model: nn.Module, i: int) -> str:
    """Decoder layer i's module path (as in named_modules and adapter files)."""
    return f"{model.base_model_prefix}.layers.{i}"


def embed(model: nn.Module) -> nn.Module:
    """The token embedding (Gemma's multiplies by sqrt(hidden_size) itself)."""
    return model.get_input_embeddings()


def final_norm(model: nn.Module) -> nn.Module:
    """The norm after the last decoder layer."""
    return decoder(model).norm


def norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", None) or norm.eps)


def head(model: nn.Module) -> nn.Module:
    """The output projection to the vocabulary (tied to the embedding on some models)."""
    return model.get_output_embeddings()


def logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The model's logits from final-norm hidden states h (..., hidden): the head, soft-capped where the family
    caps them. (..., vocab) in the head's dtype."""
    out = head(model)(h)
    cap = final_softcap(model)
    return out if cap is None else torch.tanh(out / cap) * cap


class LayerParts(NamedTuple):
    """One decoder layer's modules, named by what they do. h + post_attn(attn(input_norm(h))), then
    h + post_mlp(mlp(pre_mlp(h))); post_attn and post_mlp are None where the family has no sandwich norms."""
    input_norm: nn.Module
    attn: nn.Module  # q/k/v projections (Family.qkv) and o_proj; .scaling, .head_dim
    q_norm: nn.Module | None  # per-head norms of q and k before RoPE (Family.qk_norm)
    k_norm: nn.Module | None
    post_attn: nn.Module | None
    pre_mlp: nn.Module
    mlp: nn.Module  # gate/up projections (Family.gate_up), down_proj, the activation; called as a whole
    post_mlp: nn.Module | None


def layer_parts(layer: nn.Module) -> LayerParts:
    attn = layer.self_attn
    if hasattr(layer, "pre_feedforward_layernorm"):  # sandwich norms (Gemma 2 and 3)
        post_attn, pre_mlp = layer.post_attention_layernorm, layer.pre_feedforward_layernorm
        post_mlp = layer.post_feedforward_layernorm
    else:
        post_attn, pre_mlp, post_mlp = None, layer.post_attention_layernorm, None
    return LayerParts(layer.input_layernorm, attn, getattr(attn, "q_norm", None), getattr(attn, "k_norm", None),
                      post_attn, pre_mlp, layer.mlp, post_mlp)


def qkv_modules(fam: Family, attn: nn.Module) -> list[nn.Module]:
    """The attention's input projections: [q, k, v], or [qkv] where the family fuses them."""
    return [getattr(attn, n) for n in fam.qkv]


def gate_up_modules(fam: Family, mlp: nn.Module) -> list[nn.Module]:
    return [getattr(mlp, n) for n in fam.gate_up]


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def project_qkv(fam: Family, attn: nn.Module, x: torch.Tensor, sizes: tuple[int, int, int], proj=_call,
                group=None):
    """x (b, s, hidden) -> q (b, s, heads, d), k and v (b, s, kv_heads, d) through the attention's own projection
    modules (where each row's adapter is added), split where they are fused; `sizes` from qkv_sizes. proj(module,
    x) applies a projection (default: calls it; the static decoder adds its batch's adapters in place); group(mods,
    x), where given, applies separate projections of one input together (the decoder's grouped adapter kernels)."""
    b, s, _ = x.shape
    mods = qkv_modules(fam, attn)
    if len(mods) == 3:
        outs = group(mods, x) if group is not None else [proj(m, x) for m in mods]
    else:
        outs = proj(mods[0], x).split(list(sizes), dim=-1)
    return tuple(o.view(b, s, -1, attn.head_dim) for o in outs)


def project_mlp(fam: Family, mlp: nn.Module, x: torch.Tensor, proj=_call, group=None) -> torch.Tensor:
    """The MLP's output, each projection applied through proj (and gate with up through group, as in project_qkv):
    down(act(gate(x)) * up(x)), gate and up split from one fused module where the family fuses them (the model's
    MLP computes the same)."""
    mods = gate_up_modules(fam, mlp)
    if len(mods) == 2:
        gate, up = group(mods, x) if group is not None else (proj(mods[0], x), proj(mods[1], x))
    else:
        gate, up = proj(mods[0], x).chunk(2, dim=-1)
    act = mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn  # Phi-3 names it activation_fn
    return proj(mlp.down_proj, act(gate) * up)


# ---------------------------------------------------------------- rotary embedding
def _layer_types(model: nn.Module) -> list[str]:
    cfg = model.config
    return list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)


# RoPE scalings whose tables depend on the sequence's length (longrope: the long factors once it passes the
# original context); a batch computes them row by row, as each row alone would. Not reproduced: transformers' Phi-3
# generate recomputes a whole sequence once it reaches original_max_position_embeddings + 1 tokens (the keys cached
# before get the long factors too); the server keeps those keys
LENGTH_DEPENDENT_ROPE = ("longrope",)


def rotary(model: nn.Module, x: torch.Tensor, position_ids: torch.Tensor, lengths: list[int] | None = None,
           seq_lens: list[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, (cos, sin) (b, s, rotary_dim) for `position_ids` (b, s) from the model's own rotary
    module(s), their scaling included; layers of one kind share one pair. x gives the dtype and device.
    Where the tables depend on a sequence's length: `lengths`, each row's real tokens (the rest is padding);
    `seq_lens`, the length each row's tables are chosen by where it is more than its last position + 1 (a prompt
    run a chunk at a time: offline, the whole prompt is one forward)."""
    tables = _rotary(model, x, position_ids)
    if lengths is None or rope_type(model) not in LENGTH_DEPENDENT_ROPE:
        return tables
    own = []
    for r, n in enumerate(lengths):
        pos = position_ids[r:r + 1, :n]
        if seq_lens is not None:  # one more position, the sequence's last, decides the tables; dropped below
            pos = torch.cat([pos, pos.new_full((1, 1), seq_lens[r] - 1)], dim=1)
        own.append(_rotary(model, x[r:r + 1, :1].expand(1, pos.shape[1], -1), pos))
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, (cos, sin) in enumerate(tables):
        if id(cos) not in done:
            cos, sin = cos.expand(x.shape[0], -1, -1).clone(), sin.expand(x.shape[0], -1, -1).clone()
            for r, n in enumerate(lengths):  # padding keeps the batch's values: nothing real attends to it
                cos[r, :n], sin[r, :n] = own[r][i][0][0, :n], own[r][i][1][0, :n]
            done[id(tables[i][0])] = (cos, sin)
    return [done[id(c)] for c, _ in tables]


def _rotary(model: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    body, fam = decoder(model), FAMILIES.get(model_type(model))
    n = model.config.num_hidden_layers
    if fam is None or fam.rope != "per-layer-type":
        return [body.rotary_emb(x, position_ids)] * n
    types = _layer_types(model)[:n]
    if hasattr(body, "rotary_emb_local"):  # transformers before per-layer-type rope parameters
        tables = {"full_attention": body.rotary_emb(x, position_ids),
                  "sliding_attention": body.rotary_emb_local(x, position_ids)}
    else:
        tables = {t: body.rotary_emb(x, position_ids, t) for t in set(types)}
    return [tables[t] for t in types]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (b, h, s, d), k (b, kvh, s, d), cos/sin (b, s, r) with r <= d: the first r features of each head rotated
    (rotate-half, as transformers computes it), the rest passed through (partial RoPE, Phi-3)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (b, 1, s, r)
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_rot, k_rot = q[..., :r], k[..., :r]
    return (torch.cat([q_rot * cos + _rotate_half(q_rot) * sin, q[..., r:]], dim=-1),
            torch.cat([k_rot * cos + _rotate_half(k_rot) * sin, k[..., r:]], dim=-1))


# ---------------------------------------------------------------- whole-model shortcuts
def body_and_head(model: nn.Module):
    """(decoder, head) when the logits can be computed on a subset of positions, else None."""
    if model_type(model) not in PLAIN_HEAD or not hasattr(model, "get_output_embeddings"):
        return None
    body, out = getattr(model, getattr(model, "base_model_prefix", ""), None), head(model)
    if body is None or body is model or out is None:
        return None
    return body, out


@functools.lru_cache(maxsize=None)
def cache_keyword(module_type: type) -> str:
    """The keyword a model or decoder class takes its key/value cache by, which is also the name of the output
    field that returns it: transformers renamed `past_key_values` to `cache` (the old name warns, then goes)."""
    return "cache" if "cache" in inspect.signature(module_type.forward).parameters else "past_key_values"
