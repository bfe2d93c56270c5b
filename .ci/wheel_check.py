"""CI: run from an install of the built wheel, outside the source tree (argv[1]): the loader
finds the kernel sources inside the installed package, all of them, and NVRTC compiles one
for sm_90a into the cache. Exits non-zero on any failure."""

import sys
from pathlib import Path

import torch

import vllm_atom
from vllm_atom.kernels import _loader, kv_int4

checkout = Path(sys.argv[1]).resolve()
package = Path(vllm_atom.__file__).resolve().parent
if checkout in package.parents:
    sys.exit(f"vllm_atom was imported from the checkout ({package}), not from the wheel")
if _loader.CUDA_DIR != package / "_cuda":
    sys.exit(f"the loader reads {_loader.CUDA_DIR}, not the installed {package / '_cuda'}")
for pattern in ("*.cu", "*.cuh"):
    want = sorted(p.name for p in (checkout / "cuda").glob(pattern))
    got = sorted(p.name for p in _loader.CUDA_DIR.glob(pattern))
    if got != want:
        sys.exit(f"the wheel carries {pattern} {got}, the checkout has {want}")
print(f"installed: {package}\nkernel sources: {_loader.sources()}")
cubin = _loader.compile_cubin("kv_int4.cu", kv_int4._defines(128, torch.bfloat16), "sm_90a")
cached = list(_loader.cache_dir().glob("kv_int4-sm_90a-*.cubin"))
if not cubin.startswith(b"\x7fELF") or len(cached) != 1:
    sys.exit(f"no sm_90a cubin compiled and cached (cache: {cached})")
print(f"kv_int4.cu -> sm_90a cubin, {len(cubin)} bytes, cached as {cached[0].name}")
