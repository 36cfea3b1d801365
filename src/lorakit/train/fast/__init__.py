"""Fast LoRA (and full fine-tuning) training path for Llama-family models on GPU.

    from lorakit import LoraConfig, add_adapter
    from lorakit.train import fast
    add_adapter(model, LoraConfig(r=16, alpha=32, targets="all-linear"))
    fm = fast.prepare(model)                 # compile on CUDA, fp32 adapters, fused q/k/v
    opt = fast.adamw(fm, lr=2e-4)
    loss = fm(input_ids, labels=labels)      # HF's causal-LM loss, without the logits tensor
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

The plain path (the HF model's own forward with lorakit's LoraLinear) stays the reference; the
tests check that both give the same losses and gradients.
"""
from lorakit.train.fast.fuse import fuse_projections, unfuse_projections
from lorakit.train.fast.layer import LayerSpec, decoder_layer, rms_norm
from lorakit.train.fast.loss import chunk_loss_and_grad, linear_cross_entropy, shift_targets
from lorakit.train.fast.model import FastLlama, adamw, prepare

__all__ = ["prepare", "adamw", "FastLlama", "linear_cross_entropy", "chunk_loss_and_grad", "shift_targets",
           "fuse_projections", "unfuse_projections", "decoder_layer", "rms_norm", "LayerSpec"]
