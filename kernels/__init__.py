"""Fused ops of the DiT-Reward engine: one file per op (Triton kernel, launcher, autograd, public function, *_ref).

Importing this package does not import triton; the backend is chosen per call by ``kernels.backend.resolve``.
"""

from kernels.adaln import (
    gated_residual,
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_fp8,
    layernorm_modulate,
    layernorm_modulate_fp8,
)
from kernels.backend import resolve
from kernels.noise import near_clean
from kernels.pooling import mean_pool, mean_pool_into
from kernels.qknorm import joint_qkv
from kernels.quant import quantize_rowwise

__all__ = [
    "gated_residual",
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_fp8",
    "joint_qkv",
    "layernorm_modulate",
    "layernorm_modulate_fp8",
    "mean_pool",
    "mean_pool_into",
    "near_clean",
    "quantize_rowwise",
    "resolve",
]
