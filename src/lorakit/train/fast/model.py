"""The fast training path: `prepare(model)` wraps a Hugging Face Llama (with lorakit adapters, or
with trainable base weights for full fine-tuning) into a module whose forward returns the loss.

What it does differently from calling the HF model (see docs/gpu.md for the measurements):
- one compiled graph per decoder layer (layer.py), shared by all layers: fused norms, RoPE, SiLU and
  LoRA adds; the compiler's partitioner keeps matmul/attention outputs and recomputes the cheap rest;
- frozen weights never get gradients; adapter A/B are float32 parameters (optimizer maths in fp32)
  cast to the compute dtype inside the graph, so the activations stay bf16;
- q/k/v and gate/up run as one matmul each (fuse.py), and the LoRA A of q/k/v (gate/up) reads x once;
- causal SDPA with no mask tensor (flash/cuDNN kernels) and native grouped-query attention;
- the loss never materialises (tokens x vocab) logits (loss.py);
- optional full recomputation of the first `recompute_layers` layers, to trade speed for memory.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from lorakit import arch, kernels
from lorakit.core.inject import LoraLinear
from lorakit.train.fast.fuse import fuse_projections, groups, stacked
from lorakit.train.fast.layer import LayerParams, LayerSpec, Lora, Proj, checkpointed_layer, decoder_layer, rms_norm
from lorakit.train.fast.packing import DocMasks, flex_available
from lorakit.train.fast.loss import (IGNORE_INDEX, chunk_loss_and_grad, default_chunk,
                   linear_cross_entropy, shift_targets)

SUPPORTED = ("llama",)


def lora_of(mod: nn.Module, path: str) -> Lora | None:
    """The active adapter of a projection as a `Lora`, None for a plain linear; errors otherwise."""
    if isinstance(mod, LoraLinear):
        if mod.merged:
            raise ValueError(f"{path}: adapters are merged; unmerge before using the fast path")
        if mod.routing is not None:
            raise ValueError(f"{path}: a routing hook is set; the fast path trains one adapter")
        active = [(n, w) for n, w in mod.active.items() if n in mod.adapters]
        if len(active) > 1:
            raise ValueError(f"{path}: {len(active)} active adapters {[n for n, _ in active]}; "
                             "the fast path trains exactly one (set_active(model, name))")
        if not active:
            return None
        name, w = active[0]
        p = mod.adapters[name]
        if p.lora_magnitude_vector is not None:
            raise ValueError(f"{path}: adapter {name!r} is DoRA; the fast path supports plain LoRA")
        drop = p.dropout.p if isinstance(p.dropout, nn.Dropout) else 0.0
        return Lora(p.lora_A, p.lora_B, float(p.scale * w), float(drop))
    if type(mod) is not nn.Linear:
        raise ValueError(f"{path}: {type(mod).__name__} is not supported by the fast path "
                         "(expected nn.Linear or lorakit LoraLinear)")
    return None


def check_model(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    kind = arch.model_type(model)
    if kind not in SUPPORTED:
        raise ValueError(f"the fast path supports model types {SUPPORTED}, got {kind!r}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (expected 'silu')")
    if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) != 0.0:
        raise ValueError(f"attention_dropout={cfg.attention_dropout} is not supported (expected 0.0)")
    if getattr(arch.head(model), "bias", None) is not None:
        raise ValueError("an lm_head with a bias is not supported")


def _probe_gqa(head_dim: int, dtype: torch.dtype, device: torch.device) -> str:
    """'native' if a fused SDPA kernel takes grouped-query attention as is, else 'expand'."""
    if device.type != "cuda":
        return "native"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 4, 16, head_dim, device=device, dtype=dtype)
    kv = torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return "native"
    except RuntimeError:
        return "expand"


class FastLlama(nn.Module):
    """forward(input_ids, labels=None, attention_mask=None) -> mean token loss (HF's definition)."""

    def __init__(self, model: nn.Module, *, compile: bool, recompute_layers: int, chunk: int,
                 fuse: bool, gqa: str, attn_backends: tuple, wide: bool = True, fused_mlp: bool = False,
                 compile_options: dict | None = None, ce_kernel: bool = True, device: torch.device | None = None,
                 flex: bool | None = None):
        super().__init__()
        self.model = model
        cfg = model.config
        n_layers = len(arch.decoder_layers(model))
        if not isinstance(recompute_layers, int) or not 0 <= recompute_layers <= n_layers:
            raise ValueError(f"recompute_layers must be an integer in [0, {n_layers}], got {recompute_layers!r}")
        self.recompute_layers, self.chunk, self.fuse, self.wide = recompute_layers, chunk, fuse, wide
        head_dim = arch.head_dim(cfg)
        w = arch.head(model).weight
        if gqa == "auto":
            gqa = _probe_gqa(head_dim, w.dtype, device or w.device)
        self.spec = LayerSpec(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
                              float(cfg.rms_norm_eps), gqa, tuple(attn_backends), fused_mlp)
        self.compiled = compile
        self.use_flex = flex_available(device or w.device) if flex is None else flex
        self.doc_mask = DocMasks(self.use_flex)
        if compile:
            _raise_recompile_limit()
            opts = dict(compile_options or {}) or None
            self._layer = torch.compile(decoder_layer, dynamic=False, options=opts)
            self._ckpt_layer = torch.compile(checkpointed_layer, dynamic=False, options=opts)
            self._norm = torch.compile(rms_norm, dynamic=False, options=opts)
            self._chunk_fn = torch.compile(chunk_loss_and_grad, dynamic=False, options=opts)
            if ce_kernel and (device or w.device).type == "cuda" and kernels.HAS_TRITON:
                self._chunk_fn = kernels.ce_chunk  # the Triton kernel (gradient written over the logits)
        else:
            self._layer, self._ckpt_layer = decoder_layer, checkpointed_layer
            self._norm, self._chunk_fn = rms_norm, chunk_loss_and_grad
        self.layer_params()  # validate every projection now, not at the first step

    # ---- parameters, gathered each step (adapters may be swapped between steps) ----
    def _proj(self, parent: nn.Module, names: tuple, path: str) -> Proj:
        mods = [getattr(parent, n) for n in names]
        loras = tuple(lora_of(m, f"{path}.{n}") for m, n in zip(mods, names))
        sizes = tuple(m.out_features for m in mods)
        both = stacked(mods) if (self.fuse and len(mods) > 1) else None
        if both is not None:
            wide = self.wide and all(lo is not None for lo in loras)
            return Proj((both[0],), (both[1],), loras, sizes, wide)
        return Proj(tuple(m.weight for m in mods), tuple(getattr(m, "bias", None) for m in mods), loras, sizes)

    def layer_params(self) -> list[LayerParams]:
        return [self._layer_params(i, layer) for i, layer in enumerate(arch.decoder_layers(self.model))]

    def _layer_params(self, i: int, layer: nn.Module) -> LayerParams:
        path, p = arch.layer_path(self.model, i), arch.layer_parts(layer)
        if p.q_norm is not None or p.post_attn is not None:
            raise ValueError(f"{path}: attention with q/k norms or sandwich norms is not supported")
        (qkv, gate_up), (attn, mlp) = groups(self.model), (f"{path}.self_attn", f"{path}.mlp")
        return LayerParams(
            p.input_norm.weight,
            self._proj(p.attn, qkv, attn),
            self._proj(p.attn, ("o_proj",), attn),
            p.pre_mlp.weight,
            self._proj(p.mlp, gate_up, mlp),
            self._proj(p.mlp, ("down_proj",), mlp))

    def _run_layer(self, i: int, layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask=None) -> Tensor:
        fn = self._ckpt_layer if i < self.recompute_layers else self._layer

        def forward(x, cos, sin):  # the parameters are read here: inside the module call, when FSDP gathered them
            return fn(x, cos, sin, self._layer_params(i, layer), self.spec, self.training, mask)
        return as_forward(layer, forward, x, cos, sin)

    def trainable_parameters(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    # ---- forward ----
    def forward(self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, seq_lens: tuple | None = None,
                target_pos: tuple | None = None) -> Tensor:
        """Packed rows (train/data.py `pack`): input_ids, labels and position_ids (1, s), seq_lens the segments'
        lengths (ints); attention stays within each segment (train/fast/packing.py). target_pos: the flat
        positions whose next label is a target (ints, from `pack`): only they go through the head and loss."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if attention_mask is not None:
            labels = _mask_right_padding(labels, attention_mask)
        m = self.model
        b, s = input_ids.shape
        mask = None
        if seq_lens is not None:
            if b != 1 or position_ids is None or sum(seq_lens) != s:
                raise ValueError(f"packed rows: expected input_ids (1, s), position_ids and seq_lens summing to s, "
                                 f"got {tuple(input_ids.shape)} and seq_lens sum {sum(seq_lens)}")
            mask = self.doc_mask(seq_lens, input_ids.device)
        x = arch.embed(m)(input_ids)                                        # (b, s, hidden)
        pos = torch.arange(s, device=input_ids.device)[None] if position_ids is None else position_ids  # (1, s)
        cos, sin = arch.rotary(m, x, pos)[0]                                # (1, s, d) each (one RoPE: llama)
        cos, sin = cos[0], sin[0]                                           # (s, d)
        for i, layer in enumerate(arch.decoder_layers(m)):
            x = self._run_layer(i, layer, x, cos, sin, mask)
        norm = arch.final_norm(m)
        x = self._norm(x, norm.weight, arch.norm_eps(norm))
        targets = shift_targets(labels)                                     # (b * s,)
        h = x.view(b * s, -1)                                               # (b * s, hidden)
        if target_pos is not None:  # only the positions that predict a target reach the head
            idx = self._target_index(target_pos, b * s, input_ids.device)    # (n',) n' a bucket >= n
            h, targets = h.index_select(0, idx), targets.index_select(0, idx)
        head = arch.head(m)

        def loss(h):                                                        # h (n, hidden)
            return linear_cross_entropy(h, head.weight, targets, chunk=self.chunk, chunk_fn=self._chunk_fn)
        return as_forward(head, loss, h)

    def target_bucket(self, n: int) -> int:
        """Target positions are padded to this many: a power of two from 128, then multiples of the loss chunk."""
        return max(128, 1 << max(n - 1, 0).bit_length()) if n <= self.chunk else -(-n // self.chunk) * self.chunk

    def _target_index(self, pos, total: int, device) -> Tensor:
        """Host positions -> a device index padded to `target_bucket` (few shapes) with the last position, which
        predicts nothing (its target is IGNORE)."""
        n = len(pos)
        width = self.target_bucket(n)
        idx = torch.full((width,), total - 1, dtype=torch.long)
        idx[:n] = torch.as_tensor(pos, dtype=torch.long)
        return idx.to(device, non_blocking=True)


def as_forward(module: nn.Module, fn, *args):
    """fn(*args), run as `module`'s forward where the module has forward hooks, so they run around it: FSDP2's
    (train/distributed.py) gather the module's sharded weights before, free them after and reduce-scatter their
    gradients. Without hooks, a plain call."""
    if not (module._forward_pre_hooks or module._forward_hooks):
        return fn(*args)
    module.forward = fn  # an instance attribute, for this call only
    try:
        return module(*args)
    finally:
        del module.forward


def _mask_right_padding(labels: Tensor, mask: Tensor) -> Tensor:
    """With right padding (ones then zeros per row) causal attention never lets a real token see a
    pad, so the mask only has to keep pads out of the loss. Left padding would need the mask."""
    if mask.shape != labels.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(labels.shape)}")
    m = mask.bool()
    if bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("attention_mask must be right-padded (ones, then zeros, per row) for the fast "
                         "path; pack sequences or pad on the right")
    return labels.masked_fill(~m, IGNORE_INDEX)


def _raise_recompile_limit(n: int = 64) -> None:
    """One graph per (shape, first-layer) pair; several models in one process need more than 8."""
    import torch._dynamo.config as dc

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, key) and getattr(dc, key) < n:
            setattr(dc, key, n)


def prepare(model: nn.Module, *, compile: bool | None = None, recompute_layers: int = 0,
            chunk: int | None = None, fuse: bool = True, adapter_dtype: torch.dtype | None = torch.float32,
            gqa: str = "auto", attn_backends: tuple = (), wide: bool = True, fused_mlp: bool = False,
            compile_options: dict | None = None, ce_kernel: bool = True,
            device: torch.device | str | None = None, flex: bool | None = None) -> FastLlama:
    """Wrap a HF Llama for fast training. Trains what requires grad: the active lorakit adapter
    (after `add_adapter`), or the base weights for full fine-tuning.

    compile: torch.compile the layer/loss graphs (default: on CUDA). recompute_layers: how many layers
    (from the first) keep only their input and recompute the rest in backward. chunk: tokens per
    loss chunk (default: ~2^28 logits). fuse: stack frozen q/k/v and gate/up weights (fuse.py).
    wide: on stacked projections, fold the LoRA up-projection into the base matmul (layer.py).
    fused_mlp: with LoRA on gate/up/down (no dropout), run the SwiGLU middle and the LoRA side of the
    MLP as one pass forward and one backward (mlp.py; Triton kernels on CUDA). Off by default: on an
    H100 it saves 4.5 GiB on the 1b case (7.5 GiB on 8b) but costs ~8 ms a step (docs/gpu.md, round 2).
    compile_options: torch.compile `options` (Inductor config, e.g. {"coordinate_descent_tuning": True}).
    ce_kernel: with compile on CUDA, the loss chunks go through kernels.ce_chunk (the Triton kernel of
    kernels/triton_ce.py, gradient written over the logits) instead of the compiled plain-torch reference.
    adapter_dtype: dtype for the trainable adapter tensors (float32: the optimizer's update is not lost
    to bf16 rounding; compute still runs in the base dtype). Call before creating the optimizer.
    device: where the model will train (default: where its weights are now; FSDP moves a CPU-loaded model's
    shards to the GPU after this): decides compile, the attention probe and the loss kernel.
    flex: packed rows' document mask as a FlexAttention BlockMask (default: on CUDA) or a dense SDPA mask.
    """
    check_model(model)
    if gqa not in ("auto", "native", "expand"):
        raise ValueError(f"gqa must be 'auto', 'native' or 'expand', got {gqa!r}")
    if adapter_dtype is not None:
        for _, layer in _lora_modules(model):
            for p in layer.parameters(recurse=True):
                if p.requires_grad and p.dtype != adapter_dtype and p.is_floating_point():
                    p.data = p.data.to(adapter_dtype)
    if fuse:
        fuse_projections(model)
    head = arch.head(model)
    dev = torch.device(device) if device is not None else head.weight.device
    if compile is None:
        compile = dev.type == "cuda"
    if chunk is None:
        chunk = default_chunk(head.weight.shape[0])
    return FastLlama(model, compile=compile, recompute_layers=recompute_layers, chunk=chunk, fuse=fuse,
                     gqa=gqa, attn_backends=tuple(attn_backends), wide=wide, fused_mlp=fused_mlp,
                     compile_options=compile_options, ce_kernel=ce_kernel, device=dev, flex=flex)


def _lora_modules(model: nn.Module):
    for path, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            yield path, mod.adapters


def adamw(fast: FastLlama | nn.Module, lr: float = 1e-4, **kw) -> torch.optim.AdamW:
    """AdamW over the trainable tensors only; fused kernel on CUDA."""
    params = fast.trainable_parameters() if isinstance(fast, FastLlama) else \
        [p for p in fast.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad (add an adapter first)")
    if "fused" not in kw:
        kw["fused"] = params[0].is_cuda
    return torch.optim.AdamW(params, lr=lr, **kw)
