"""The image and language model library: Stage1 wrappers, the prefix-LM, attention backends,
fused kernels and LoRA variants, prompt templates and the packing collate."""
