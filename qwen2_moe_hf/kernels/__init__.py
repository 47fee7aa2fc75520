"""The bottom layer: every custom op schema with its fake (ops.py), the extension builder (build.py), the C++ / CUDA
sources (csrc/) and the Triton kernels (triton_moe.py, imported on first use: triton is optional)."""
