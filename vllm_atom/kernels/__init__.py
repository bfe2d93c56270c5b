"""Device bridge: torch custom ops over the CUDA kernels in ``cuda/`` (CuPy/NVRTC).

Importing this package imports neither vllm nor cupy; CUDA code is compiled on first use.
"""
