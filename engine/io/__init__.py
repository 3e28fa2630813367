"""Weights in, weights out: `sources` (safetensors files, the diffusers layout), `single_file` (the original SD3
layout), `backbone` (build and fill the backbone, check its weights) and `checkpoint` (our reward checkpoints)."""
