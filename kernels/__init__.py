"""mxq.kernels — the CUDA C kernels, their NVRTC compiler/loader, and the CPU emulation harness.

  gemv_affine.cu     fused dequant + GEMV (batch 1) for every affine (bits, group size)
  dequant_affine.cu  affine → dense fp32/fp16 rows on the device (prefill GEMM input; quantized
                     embedding rows)
  gemv_lut.cu        lut: fused codebook-lookup GEMV, and dequantization to dense rows
  gemv_vq.cu         vq: fused point-lookup GEMV for every (bits, dim), and dequantization to dense rows
  gemv_f16.cu        fp16 matrices (an fp16 lm_head): GEMV reading the fp16 weights once
  ops.cu             RMSNorm, RoPE (full or partial rotary), KV-cache store, attention (fp16 or fp32
                     cache, GQA, attention scale, sliding window, split-K), SiLU·mul, GELU(tanh)·mul,
                     fp16 embedding gather, add, scale
  affine.cuh         pack decoding shared by the two affine kernels; common.cuh: types, fp16, reductions
  registry.py        every entry point's exact argument list, and the launch geometry helpers
  nvrtc.py           NVRTC compile for sm_75…sm_90 (no GPU needed) and load_module() for a real GPU
  cuda_emu.h         the CUDA subset for g++; emulator.py builds the .cu files with it and launches
                     kernels from Python through ctypes (get_emulator(), EmulatedModule)

Both load paths give an object with .get_function(name) → kernel(grid, block, args), so a backend
written against that interface runs on a GPU (nvrtc.load_module()) and on the CPU emulator
(emulator.EmulatedModule()) alike. Nothing here imports CuPy at import time.
"""
from .registry import (AFFINE_CONFIGS, KERNELS, SOURCES, AttentionPlan, Kernel, attention_first_key, attention_launch,
                       dequant_launch, dequant_name, elementwise_launch, gemv_launch, gemv_name, kernels_in,
                       rope_items, rowwise_launch)

__all__ = ["AFFINE_CONFIGS", "KERNELS", "SOURCES", "AttentionPlan", "Kernel", "attention_first_key",
           "attention_launch", "dequant_launch", "dequant_name", "elementwise_launch", "gemv_launch", "gemv_name",
           "kernels_in", "rope_items", "rowwise_launch"]
