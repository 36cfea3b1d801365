"""One Llama decoder layer as a pure function of tensors (what `torch.compile` sees).

The function reads the same Parameters the Hugging Face model holds (frozen base weights, the active
adapter's A/B), so the fast path and the plain path (HF model + `LoraLinear`) train the same tensors.
Numerics follow HF's Llama exactly: RMSNorm in float32 cast back before the weight multiply, RoPE on
(b, h, s, d) with rotate-half, causal SDPA, SiLU-gated MLP, LoRA delta s * B A dropout(x).

Why a function and not modules: one compiled graph serves every layer (guards are on shapes and
dtypes, not on which layer's Parameters come in), and AOTAutograd's partitioner then decides what to
save for backward: matmul and attention outputs are kept, cheap elementwise work (norms, RoPE, SiLU,
the LoRA adds) is recomputed inside the fused backward kernels. Frozen weights get no gradient at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.train.fast.mlp import fusable_mlp, fused_mlp


class Lora(NamedTuple):
    """One adapter on one projection: A (r, in), B (out, r) (any dtype: cast to x's), scale, dropout p."""
    A: Tensor
    B: Tensor
    scale: float
    dropout: float


class Proj(NamedTuple):
    """Projections that read the same input (q/k/v; gate/up; o or down alone). `weights` holds either
    one stacked (sum(sizes), in) weight, split after a single matmul, or one weight per part (one
    matmul each). Each part gets its own LoRA delta."""
    weights: tuple                 # (out_i, in) per part, or one (sum(sizes), in)
    biases: tuple                  # matching `weights`: tensor or None each
    loras: tuple                   # one Lora or None per part
    sizes: tuple                   # output sizes of the parts
    wide: bool = False             # one stacked frozen weight, LoRA on every part: `project_wide`


class LayerParams(NamedTuple):
    ln_in: Tensor                  # (hidden,) input RMSNorm weight
    qkv: Proj
    o: Proj
    ln_post: Tensor                # (hidden,) post-attention RMSNorm weight
    gate_up: Proj
    down: Proj


@dataclass(frozen=True)
class LayerSpec:
    """Static facts about the layer (constants to the compiler)."""
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    gqa: str = "native"            # "native": SDPA enable_gqa; "expand": repeat k/v to n_heads
    attn_backends: tuple = ()      # SDPBackend names in priority order; () = torch's own choice
    fused_mlp: bool = False        # SwiGLU middle + gate/up/down LoRA in one pass each way (mlp.py)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def lora_deltas(x: Tensor, loras: Sequence, training: bool) -> list:
    """Each part's s * B A drop(x), or None. With no dropout the parts share one A matmul:
    x is read once for all of q/k/v (or gate/up)."""
    live = [(i, lo) for i, lo in enumerate(loras) if lo is not None]
    out: list = [None] * len(loras)
    if not live:
        return out
    dt = x.dtype
    if not training or all(lo.dropout == 0.0 for _, lo in live):
        a_all = torch.cat([lo.A for _, lo in live]).to(dt) if len(live) > 1 else live[0][1].A.to(dt)
        xa_all = F.linear(x, a_all)                                  # (b, s, sum r)
        xas = xa_all.split([lo.A.shape[0] for _, lo in live], dim=-1)
    else:  # independent dropout masks per projection, in the order HF calls them
        xas = [F.linear(F.dropout(x, lo.dropout, True), lo.A.to(dt)) for _, lo in live]
    for (i, lo), xa in zip(live, xas):
        out[i] = F.linear(xa * lo.scale, lo.B.to(dt))                 # (b, s, out_i)
    return out


class _WideMatmul(torch.autograd.Function):
    """y = [x | s xA] @ [W | B]^T + b: the base matmul and the LoRA up-projection as ONE matmul
    with K = in + R, so the (tokens x out) LoRA delta is never written, read back and added.
    Backward: d[x | s xA] = [dy @ W | dy @ B], dB = dy^T (s xA); W gets no gradient. (Forming
    [W | B] again in backward would be merged with the forward's copy by the compiler, which then
    keeps a weight-sized tensor alive per layer until backward: measured +4.5 GiB on the 1b shape.)"""

    @staticmethod
    def forward(ctx, hx: Tensor, weight: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
        # hx (..., in + R), weight (out, in) frozen, b (out, R) block-diagonal over the parts
        ctx.save_for_backward(hx, weight, b)
        return F.linear(hx, torch.cat([weight, b.to(weight.dtype)], dim=1), bias)   # (..., out)

    @staticmethod
    def backward(ctx, dy: Tensor):
        hx, weight, b = ctx.saved_tensors
        d_hx = torch.cat([dy @ weight, dy @ b.to(weight.dtype)], dim=-1)             # (..., in + R)
        r = b.shape[1]
        d_b = dy.reshape(-1, dy.shape[-1]).t() @ hx[..., -r:].reshape(-1, r)        # (out, R)
        return d_hx, None, d_b.to(b.dtype), None


def project_wide(x: Tensor, p: Proj, training: bool) -> list:
    """`project` for a stacked weight whose parts all carry LoRA, through `_WideMatmul`."""
    dt = x.dtype
    los = p.loras
    if not training or all(lo.dropout == 0.0 for lo in los):
        xa = F.linear(x, torch.cat([lo.A for lo in los]).to(dt))                   # (b, s, R)
        xas = list(xa.split([lo.A.shape[0] for lo in los], dim=-1))
    else:
        xas = [F.linear(F.dropout(x, lo.dropout, True), lo.A.to(dt)) for lo in los]
    hx = torch.cat([x] + [xa_i * lo.scale for xa_i, lo in zip(xas, los)], dim=-1)  # (b, s, in + R)
    b_bd = torch.block_diag(*[lo.B for lo in los])                                  # (sum out, R)
    y = _WideMatmul.apply(hx, p.weights[0], b_bd, p.biases[0])                      # (b, s, sum out)
    return list(y.split(list(p.sizes), dim=-1))


def project(x: Tensor, p: Proj, training: bool) -> list:
    """The parts of x W^T + b, each with its LoRA delta added."""
    if p.wide:
        return project_wide(x, p, training)
    if len(p.weights) == len(p.sizes):
        parts = [F.linear(x, w, b) for w, b in zip(p.weights, p.biases)]  # (b, s, out_i) each
    else:
        y = F.linear(x, p.weights[0], p.biases[0])                      # (b, s, sum(sizes))
        parts = y.split(list(p.sizes), dim=-1)
    deltas = lora_deltas(x, p.loras, training)
    return [part if d is None else part + d for part, d in zip(parts, deltas)]


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE, rotate-half convention. x (b, h, s, d); cos/sin (s, d)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def attention(q: Tensor, k: Tensor, v: Tensor, spec: LayerSpec, mask=None) -> Tensor:
    """Causal attention. q (b, h, s, d), k/v (b, kvh, s, d) -> (b, h, s, d). `mask`: None (causal, no mask
    tensor), a FlexAttention BlockMask (packed rows: causal within each row), or a boolean (1, 1, s, s) mask."""
    gqa = spec.n_kv_heads != spec.n_heads
    if mask is not None and not isinstance(mask, Tensor):  # a BlockMask (train/fast/packing.py)
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=mask, scale=spec.head_dim ** -0.5, enable_gqa=gqa)
    if gqa and spec.gqa == "expand":
        rep = spec.n_heads // spec.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    kw = dict(is_causal=mask is None, attn_mask=mask, scale=spec.head_dim ** -0.5, enable_gqa=gqa)
    if not spec.attn_backends:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, name) for name in spec.attn_backends]
    with sdpa_kernel(backends, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def decoder_layer(x: Tensor, cos: Tensor, sin: Tensor, p: LayerParams, spec: LayerSpec,
                  training: bool, mask=None) -> Tensor:
    """x (b, s, hidden) -> (b, s, hidden). `mask`: see `attention` (None: plain causal)."""
    b, s, _ = x.shape
    h = rms_norm(x, p.ln_in, spec.eps)
    q, k, v = project(h, p.qkv, training)                              # (b, s, h*d), (b, s, kvh*d) x2
    q = q.view(b, s, spec.n_heads, spec.head_dim).transpose(1, 2)       # (b, h, s, d)
    k = k.view(b, s, spec.n_kv_heads, spec.head_dim).transpose(1, 2)    # (b, kvh, s, d)
    v = v.view(b, s, spec.n_kv_heads, spec.head_dim).transpose(1, 2)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    o = attention(q, k, v, spec, mask).transpose(1, 2).reshape(b, s, spec.n_heads * spec.head_dim)
    x = x + project(o, p.o, training)[0]
    h = rms_norm(x, p.ln_post, spec.eps)
    if spec.fused_mlp and fusable_mlp(p.gate_up, p.down, training):
        return x + fused_mlp(h, p.gate_up, p.down)
    gate, up = project(h, p.gate_up, training)                          # (b, s, mlp) x2
    return x + project(F.silu(gate) * up, p.down, training)[0]


def checkpointed_layer(x: Tensor, cos: Tensor, sin: Tensor, p: LayerParams, spec: LayerSpec,
                       training: bool, mask=None) -> Tensor:
    """The same layer, its activations recomputed in backward (only x is kept)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(decoder_layer, x, cos, sin, p, spec, training, mask, use_reentrant=False)
