"""Packed rows through a Hugging Face model's own forward (the plain backend): attention one row at a time.

transformers packs by itself when given position_ids that restart per row and no attention mask, but with
SDPA it then builds a dense (s, s) mask over the whole packed row and attends across all of it: on a batch of
8 chat rows of 90 tokens that is 8x the attention work of the rows alone. Here an attention function is
registered with transformers' AttentionInterface (its documented extension point) under NAME: given the rows'
lengths (`row_lens`, passed through the model's forward like its other attention keyword arguments) it runs
causal SDPA on each row's own keys and values (and, after a shared prefix in the cache, on the prefix's keys as
well); without them it is exactly transformers' SDPA attention, so padded batches (eval, --no-pack) and the
shared prefix's own forward are unchanged. Its mask function is SDPA's.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "lorakit_rows"
_registered = False


def rows_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                   is_causal=None, **kwargs):
    """query (1, h, s, d), key/value (1, kvh, p + s, d) (p: a shared prefix's cached positions) -> (1, s, h, d).
    With `prefix_len` = p (and no cache) the first p positions of the call are the shared prefix itself: query
    and key/value are both (.., p + s, d), and the output covers the prefix's positions too."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lens = kwargs.pop("row_lens", None)
    if lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    head = int(kwargs.pop("prefix_len", 0) or 0)  # a shared prefix run in the same call, before the rows
    gqa = query.shape[1] != key.shape[1]
    drop = dropout if module.training else 0.0
    p = key.shape[2] - query.shape[2]
    outs = []
    if head:  # the prefix attends causally to itself; every row then sees it as it would see a cached prefix
        outs.append(F.scaled_dot_product_attention(query[:, :, :head], key[:, :, :head], value[:, :, :head],
                                                   is_causal=True, dropout_p=drop, scale=scaling, enable_gqa=gqa))
        query, p = query[:, :, head:], head
    # torch.split, not slicing: the backward of a split is one concatenation, where every slice's backward would
    # write its gradient into a zeroed full-size tensor and add it up (a zero-fill and an add per row and layer)
    lens = [int(n) for n in lens]
    qs = torch.split(query, lens, dim=2)                                      # each (1, h, n, d)
    ks = torch.split(key[:, :, p:] if p else key, lens, dim=2)              # each (1, kvh, n, d)
    vs = torch.split(value[:, :, p:] if p else value, lens, dim=2)
    kp, vp = (key[:, :, :p], value[:, :, :p]) if p else (None, None)
    masks: dict[int, torch.Tensor] = {}
    for q, k, v in zip(qs, ks, vs):
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
