"""Lowerings of the IR to source text: LLVM IR for the CPU, CUDA C for NVIDIA GPUs.

Pure functions from an UpdateRule to text; no compiler is called here.
"""
