"""Training memory for a 4-bit base: the frozen input embedding kept in host memory.

A lookup needs only the rows of the batch's tokens, so the table (128256 x 4096 bf16 = 0.98 GiB for a Llama-3
8B, as large as its head) stays in pinned host memory, the rows are gathered there, and only they go to the
device: (b, s, d) bf16, 16 MiB for 1 x 2048 tokens. One copy of the table exists at any time (moved, never
duplicated), and `restore` puts it back on the device when training ends. Taken only where it is plainly right:
one process, a CUDA model, a plain frozen nn.Embedding not shared with the head (a tied head needs the table on
the device for its matmul anyway).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.core.state import state_of

log = logging.getLogger("lorakit.train")


class HostEmbedding(nn.Module):
    """A frozen embedding table in pinned host memory; forward returns the batch's rows on `device`. The table is
    a plain attribute, not a parameter: the model's parameters all stay on the device (code that asks a model
    for its device keeps working), and counts take it from `represented_params`."""

    def __init__(self, emb: nn.Embedding, device: torch.device):
        super().__init__()
        self.device = device
        table = emb.weight.detach().cpu()                                  # (vocab, d)
        self.table = table.pin_memory() if device.type == "cuda" else table
        self.num_embeddings, self.embedding_dim = self.table.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids.cpu(), self.table)                          # (b, s, d) on the host
        if self.device.type == "cuda":
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows.to(self.device)

    def represented_params(self) -> int:
        return self.table.numel()


def why_not_offload(model: nn.Module, device: torch.device) -> str | None:
    """The reason the input embedding stays on the device, or None when it can move to the host."""
    if device.type != "cuda":
        return f"device is {device.type}"
    if not state_of(model).quant:
        return "the base is not 4-bit (its weights dominate; the table is a small share)"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "several processes (DDP keeps every parameter on the device)"
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not nn.Embedding:
        return f"the input embedding is a {type(emb).__name__}, not a plain nn.Embedding"
    if emb.weight.requires_grad:
        return "the input embedding trains"
    if head is not None and getattr(head, "weight", None) is emb.weight:
        return "the embedding is tied to the output head (the head's matmul needs it on the device)"
    return None


def offload_embedding(model: nn.Module, device: torch.device) -> nn.Embedding | None:
    """Move the input embedding's table to pinned host memory (see the module doc). -> the original module (give it
    to `restore`), or None when it stays (the reason is logged)."""
    why = why_not_offload(model, device)
    if why:
        log.info("input embedding stays on the device: %s", why)
        return None
    emb = model.get_input_embeddings()
    model.set_input_embeddings(HostEmbedding(emb, device))
    emb.weight.data = torch.empty(0, dtype=emb.weight.dtype, device=device)  # the device copy goes
    log.info("input embedding (%.2f GiB) kept in host memory; only the batch's rows go to the device",
             emb.weight.numel() * emb.weight.element_size() / 2**30)
    return emb


def restore(model: nn.Module, emb: nn.Embedding | None) -> None:
    """Put the original embedding module back, its table on the device again."""
    if emb is None:
        return
    host = model.get_input_embeddings()
    emb.weight.data = host.table.to(host.device)
    model.set_input_embeddings(emb)
