"""The LoRA math: the layer, conv/embedding layers, injection into a model, the NF4 4-bit base, the mixture router."""
