"""How the one training loop computes a micro-batch's loss: the plain backend (the Hugging Face model's own
forward with lorakit's layers, any architecture, any device) or the fast backend (`train/fast`: fused
Llama-family layers, compiled on CUDA). The loop, its optimizer, schedule, checkpoints and metrics are the same
for both; `choose_backend` picks one and says why.

A backend is what the `Backend` protocol declares; one that brings its own data (train/diffusion.py: images, not
token rows) also has `micro_batches(...)` (`OwnData`), returning what `MicroBatchSource` declares (for text rows the
loop uses train/batches.py's MicroBatches).
"""
from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit import kernels
from lorakit.arch import body_and_head, decoder_layers, head as output_head, model_type
from lorakit.core.inject import lora_layers
from lorakit.train.data import IGNORE
from lorakit.train import packed_attention
from lorakit.train.prefix import (body_with_prefix, packed_body, packed_prefix_len, prefix_supported,
                                  shared_prefix_len)
from lorakit.train.offload import offload_embedding, restore as restore_embedding

log = logging.getLogger("lorakit.train")



class Backend(Protocol):
    """How the loop computes a micro-batch's loss. Optional (train/packing.py asks with getattr): `pack` (takes
    packed rows), `pack_off` (why not), `bucketed` (compiled: packed widths from a few buckets) and
    `warm_up(widths, pad_id, targets)` (compile them before the first step)."""
    name: str

    def loss(self, batch: dict[str, torch.Tensor], denom: float) -> tuple[torch.Tensor, int]:
        """(summed loss over the batch's target tokens / denom, target count)."""

    def close(self) -> None:
        """Undo what the backend changed in the model, if anything (the loop calls it once, at the end)."""


class MicroBatchSource(Protocol):
    """Micro-batch number m -> the same batch every time (a resumed run, or another rank, sees what the uninterrupted
    single process would have)."""
    per_epoch: int  # micro-batches an epoch
    targets: list  # per example: its target count (the loss's denominator is counted on the host)
    lengths: list  # per example: its tokens (or items), for tokens/s

    def indices(self, m: int) -> list[int]:
        """The examples of global micro-batch m (every rank's)."""

    def get(self, m: int) -> dict[str, torch.Tensor]:
        """This rank's share of micro-batch m, as the backend's loss takes it."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """A batch's target count."""


class OwnData(Backend, Protocol):
    """A backend that cuts the examples itself (images, not token rows)."""

    def micro_batches(self, examples, cfg, rank: int, world: int) -> MicroBatchSource:
        """The examples as numbered micro-batches, this rank's share of each."""


BACKENDS = ("auto", "plain", "fast")
# logits computed at once above this many (tokens x vocab) values go through the chunked loss instead
CHUNK_ABOVE = 1 << 26


def target_hidden(model, batch: dict[str, torch.Tensor], share_prefix: bool = False):
    """(hidden (n, d), head, targets (n,)) at the positions that predict a target token, or None when the
    architecture's head is not a plain projection of the last hidden state. `share_prefix`: the tokens every
    row starts with run once (train/prefix.py; the caller checked prefix_supported)."""
    parts = body_and_head(model)
    if parts is None:
        return None
    body, head = parts
    if "seq_lens" in batch:  # packed rows (data.pack): attention within each row, the shared prefix once
        hidden, labels = packed_body(body, batch, packed_prefix_len(batch) if share_prefix else 0)
        keep = labels[:, 1:] != IGNORE
        return hidden[:, :-1][keep], head, labels[:, 1:][keep]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    p = shared_prefix_len(batch) if share_prefix else 0
    if p:
        hidden = body_with_prefix(body, batch, p)                         # (b, s - p, d)
        return hidden[:, :-1][keep[:, p:]], head, labels[keep]
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False).last_hidden_state                      # (b, s, d)
    return hidden[:, :-1][keep], head, labels[keep]


def target_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the positions that predict a target token: (n, vocab) and (n,).

    The vocabulary projection runs only on those positions (for a chat or prompt/completion row, the
    completion): prompt positions never reach the head, which saves its matmul, the softmax over the
    vocabulary and their memory. The values equal the full logits' rows."""
    got = target_hidden(model, batch)
    if got is None:
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        return logits, labels[keep]
    hidden, head, targets = got
    return head(hidden), targets


def causal_lm_loss(model, batch: dict[str, torch.Tensor], denom: float | None = None,
                   share_prefix: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target tokens / denom (default: their count), and the count.
    Where the head is a plain bias-free linear and the logits would be large, the loss runs in chunks of
    positions and never holds the (n, vocab) logits (train/fast/loss.py; same value and gradients).
    `share_prefix`: see target_hidden."""
    got = target_hidden(model, batch, share_prefix)
    if got is None:
        logits, targets = target_logits(model, batch)
        n = targets.numel()
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        return loss / (denom if denom is not None else max(n, 1)), n
    hidden, head, targets = got                                             # (n, d), head, (n,)
    n = targets.numel()
    scale = 1.0 / (denom if denom is not None else max(n, 1))
    vocab = head.weight.shape[0]
    plain_head = isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward and head.bias is None
    if n * vocab <= CHUNK_ABOVE or not plain_head:
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum") * scale, n
    from lorakit.train.fast.loss import default_chunk, linear_cross_entropy
    from lorakit.train.fast.model import as_forward

    chunk = default_chunk(vocab, CHUNK_ABOVE)
    if torch.is_grad_enabled():  # as the head's forward: under FSDP its hooks gather the head's weight
        fn = _inplace_chunk_fn(hidden)
        if fn is not None:  # one bf16 logits chunk and nothing beside it: a smaller chunk costs little
            chunk = default_chunk(vocab, INPLACE_CHUNK_ELEMS)
        return as_forward(head, lambda h: linear_cross_entropy(h, head.weight, targets, chunk=chunk, chunk_fn=fn),
                          hidden) * (n * scale), n
    total = sum(F.cross_entropy(head(hidden[i:i + chunk]).float(), targets[i:i + chunk], reduction="sum")
                for i in range(0, n, chunk))
    return total * scale, n


# logits values in one chunk for the in-place loss kernel: 256 positions of a 128k vocabulary, 64 MiB in bf16
INPLACE_CHUNK_ELEMS = 1 << 25


def _inplace_chunk_fn(hidden: torch.Tensor):
    """The loss kernel that writes the gradient over the logits (kernels.ce_chunk: Triton, no float32 copy of a
    chunk), on CUDA for 16-bit activations where Triton is installed; else None (the plain-torch chunk)."""
    if hidden.device.type != "cuda" or hidden.dtype not in (torch.bfloat16, torch.float16) or not kernels.HAS_TRITON:
        return None
    return kernels.ce_chunk


class PlainBackend:
    """The model's own forward. Recompute: Hugging Face gradient checkpointing on every layer. `share_prefix`:
    the tokens all rows of a micro-batch start with run once (train/prefix.py) where the model allows it."""

    name = "plain"

    def __init__(self, model: nn.Module, recompute: int | str = 0, share_prefix: bool = False,
                 prefix_off: str = "not asked for"):
        self.model = model
        self.recompute = recompute
        why_not = prefix_off if not share_prefix else "recompute drops the cache" if recompute else \
            prefix_supported(model)
        self.share_prefix = why_not is None
        log.info("plain backend: shared prefix %s", "on" if self.share_prefix else f"off ({why_not})")
        self.pack_off = packed_attention.supported(model)  # why packed rows cannot run through this model
        self.pack = self.pack_off is None
        self._rows_attention = None
        if recompute:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(model).__name__} does not support gradient checkpointing "
                                 f"(recompute={recompute!r}); train without it")
            if recompute not in ("all", getattr(model.config, "num_hidden_layers", None)):
                log.info("plain backend: recompute=%s rounds up to every layer (Hugging Face checkpointing)",
                         recompute)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.host_embedding = offload_embedding(model, next(model.parameters()).device)  # a 4-bit base on CUDA

    def loss(self, batch: dict[str, torch.Tensor], denom: float) -> tuple[torch.Tensor, int]:
        if "seq_lens" in batch and self._rows_attention is None:  # on until close: recompute replays it
            self._rows_attention = packed_attention.rows_attention_on(self.model)
            self._rows_attention.__enter__()
        return causal_lm_loss(self.model, batch, denom, self.share_prefix)

    def close(self) -> None:
        if self._rows_attention is not None:
            self._rows_attention.__exit__(None, None, None)
            self._rows_attention = None
        if self.recompute:
            self.model.gradient_checkpointing_disable()
        restore_embedding(self.model, self.host_embedding)


class FastBackend:
    """train/fast: fused Llama layers, chunked loss, compiled on CUDA. Takes right-padded batches."""

    name = "fast"
    pack = True  # takes packed rows (data.pack); compiled: widths from a few buckets (data.choose_widths)

    def __init__(self, model: nn.Module, recompute: int | str = 0, device: torch.device | None = None,
                 fused_mlp: bool = False, compile: bool | None = None):
        from lorakit.train.fast import prepare

        n_layers = len(decoder_layers(model))
        layers = n_layers if recompute == "all" else int(recompute or 0)
        self.model = model
        # adapters are already fp32 masters (the loop's optimizer set-up); prepare leaves them as they are.
        # `device`: where it trains (under FSDP the model may still be on the CPU here): compile, kernels
        self.fm = prepare(model, recompute_layers=layers, adapter_dtype=None, device=device, fused_mlp=fused_mlp,
                          compile=compile)  # compile: default on CUDA
        self.bucketed = self.fm.compiled  # compiled graphs are per shape: packed widths come from a few buckets

    def loss(self, batch: dict[str, torch.Tensor], denom: float) -> tuple[torch.Tensor, int]:
        labels = batch["labels"]
        n = batch["n_targets"] if "n_targets" in batch else int((labels[:, 1:] != IGNORE).sum())
        if n == 0:
            return torch.zeros((), device=labels.device), 0
        if "seq_lens" in batch:  # packed rows (data.pack): a document mask keeps each row to itself
            mean = self.fm(batch["input_ids"], labels=labels, position_ids=batch["position_ids"],
                           seq_lens=batch["seq_lens"], target_pos=batch.get("target_pos"))
            return mean * (n / denom), n
        mask = None if batch.get("unpadded") else batch["attention_mask"]  # no padding: no mask to check
        mean = self.fm(batch["input_ids"], labels=labels, attention_mask=mask)
        return mean * (n / denom), n

    def warm_up(self, widths: list[int], pad_id: int, targets: list[int] = ()) -> None:
        """Compile every packed width and every bucket of target counts (`targets`: the run's micro-batches'
        counts) before the first step (forward and backward on a row of pad tokens, its loss times 0), so no
        step after it compiles; gradients and the random state are left as they were."""
        dev = output_head(self.fm.model).weight.device
        cpu_rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        params = self.fm.trainable_parameters()
        before = [p.grad for p in params]
        buckets = sorted({self.fm.target_bucket(n) for n in targets if n} or {1})
        runs = [(w, buckets[0]) for w in widths] + [(widths[-1], t) for t in buckets[1:]]
        for w, t in runs:
            ids = torch.full((1, w), pad_id, dtype=torch.long, device=dev)
            pos = torch.arange(w, device=dev)[None]
            loss = self.fm(ids, labels=ids, position_ids=pos, seq_lens=(w,), target_pos=tuple(range(min(t, w - 1))))
            (loss * 0.0).backward()
        for p, g in zip(params, before):
            p.grad = g
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, dev)

    def close(self) -> None:
        pass  # fused q/k/v (gate/up) stay views of one buffer: the HF forward and adapter files are unaffected


def fast_unsupported(model: nn.Module, *, routing: bool = False) -> str | None:
    """Why the fast backend cannot train this set-up, or None if it can."""
    from lorakit.train.fast.model import SUPPORTED, check_model, lora_of

    if routing:
        return "the mixture router routes every layer through its gates (the fast backend trains one adapter)"
    kind = model_type(model)
    if kind not in SUPPORTED:
        return f"model type {kind!r} is not one the fast backend knows ({', '.join(SUPPORTED)})"
    try:
        check_model(model)
        for path, mod in lora_layers(model):
            if ".layers." in path:
                lora_of(mod, path)
                if type(mod).__name__ != "LoraLinear":
                    return f"{path} is a {type(mod).__name__} (a quantized or non-linear base layer)"
    except ValueError as e:
        return str(e)
    return None


def choose_backend(model: nn.Module, requested: str = "auto", *, recompute: int | str = 0,
                   routing: bool = False, device: torch.device | None = None,
                   share_prefix: bool = False, prefix_off: str = "not asked for",
                   fused_mlp: bool = False) -> tuple[object, str]:
    """-> (backend, why). `auto`: fast on CUDA where the set-up allows it, else plain; `fast` raises with the
    reason when it cannot take the set-up. `device`: where the model trains (default: where it is now).
    `share_prefix`: the plain backend computes rows' shared leading tokens once where the model allows it;
    `prefix_off`: why not, when share_prefix is False (logged).
    `fused_mlp`: the fast backend's fused SwiGLU + LoRA MLP kernels (train/fast/mlp.py)."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    device = device or next(model.parameters()).device
    if requested == "plain":
        return PlainBackend(model, recompute, share_prefix, prefix_off), "asked for"
    reason = fast_unsupported(model, routing=routing)
    if requested == "fast":
        if reason:
            raise ValueError(f"--backend fast cannot train this set-up: {reason}")
        return FastBackend(model, recompute, device, fused_mlp), "asked for"
    if device.type != "cuda":
        return PlainBackend(model, recompute, share_prefix, prefix_off), \
            f"device is {device.type} (the fast backend is for CUDA)"
    if reason:
        return PlainBackend(model, recompute, share_prefix, prefix_off), reason
    return FastBackend(model, recompute, device, fused_mlp), f"CUDA and a supported {model.config.model_type} model"
