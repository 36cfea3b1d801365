"""Packed rows through a Hugging Face model's own forward (the plain backend): attention one row at a time.

transformers packs by itself when given position_ids that restart per row and no attention mask, but with
SDPA it then builds a dense (s, s) mask over the whole packed row and attends across all of it: on a batch of
8 chat rows of 90 tokens that is 8x the attention work of the rows alone. Here an attention function is
registered with transformers' AttentionInterface (its documented extension point) under NAME: given the rows'
lengths (`row_lens`, passed through the model's forward like its other attention keyword arguments) it runs
causal SDPA on each row's own keys and values (and, given `prefix_len`, first on a shared prefix at the head of
the call, whose keys every row then sees as well); without them it is exactly transformers' SDPA attention, so
padded batches (eval, --no-pack) and the padded shared-prefix forward are unchanged. Its mask function is SDPA's.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "lorakit_rows"
_registered = False


def rows_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                   is_causal=None, **kwargs):
    """query (1, h, p + s, d), key/value (1, kvh, p + s, d) -> (1, p + s, h, d). p = `prefix_len` (default 0):
    the first p positions are a prefix the rows share, attending causally to itself; then the rows (`row_lens`,
    summing to s), each attending to the prefix and causally to itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lens = kwargs.pop("row_lens", None)
    if lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    p = int(kwargs.pop("prefix_len", 0) or 0)
    gqa = query.shape[1] != key.shape[1]
    drop = dropout if module.training else 0.0
    kp, vp = key[:, :, :p], value[:, :, :p]  # sliced once: one slice backward, the prefix's gradients summed first
    outs = []
    if p:
        outs.append(F.scaled_dot_product_attention(query[:, :, :p], kp, vp, is_causal=True, dropout_p=drop,
                                                   scale=scaling, enable_gqa=gqa))
    # torch.split, not slicing: the backward of a split is one concatenation, where every slice's backward would
    # write its gradient into a zeroed full-size tensor and add it up (a zero-fill and an add per row and layer)
    lens = [int(n) for n in lens]
    qs, ks, vs = (torch.split(t[:, :, p:] if p else t, lens, dim=2) for t in (query, key, value))
    masks: dict[int, torch.Tensor] = {}
    for q, k, v in zip(qs, ks, vs):                                           # (1, h | kvh, n, d)
        n = q.shape[2]
        if p:
            k = torch.cat([kp, k], dim=2)                                     # (1, kvh, p + n, d)
            v = torch.cat([vp, v], dim=2)
            if n not in masks:                                                # the prefix, then causal
                masks[n] = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(p)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[n], dropout_p=drop, scale=scaling,
                                               enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop, scale=scaling,
                                               enable_gqa=gqa)
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, rows_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def supported(model) -> str | None:
    """Why a model's own forward cannot take packed rows this way, or None if it can."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", NAME):
        return f"its attention implementation is {impl!r} (packing runs through SDPA)"
    if not hasattr(model, "set_attn_implementation"):
        return "this transformers version cannot switch a model's attention implementation"
    return None


@contextlib.contextmanager
def rows_attention_on(model):
    """The model's attention runs through `rows_attention` inside the block (sdpa again after it)."""
    register()
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")
