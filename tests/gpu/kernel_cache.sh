#!/usr/bin/env bash
# The sm_90a kernel cubins, compiled on the CPU machine and carried to the GPU machine packed
# (a GPU call then spends no time in NVRTC; memcheck processes especially, each of which would
# compile every kernel it launches):
#     bash tests/gpu/kernel_cache.sh build     (CPU machine, repo root; ~2-3 min on 2 cores)
#         -> .kcache.tar.xz (~3 MB; every sm_90a configuration tests/test_kernel_compile.py compiles)
#     carry ".kcache.tar.xz" with .devbundle, and in the GPU command:
#     source tests/gpu/kernel_cache.sh         -> unpacked to /tmp/atom-kcache, VLLM_ATOM_KERNEL_CACHE set
# The cache key is a hash of the kernel sources and defines, so a stale pack is harmless (its
# cubins are never looked up); rebuild it after changing anything in cuda/.
if [ "${1:-}" = build ]; then
    set -euo pipefail
    tmp=$(mktemp -d)
    VLLM_ATOM_KERNEL_CACHE="$tmp/kc" python -m pytest -q -p no:cacheprovider tests/test_kernel_compile.py \
        -k "sm_90a or sm90" | tail -1
    rm -f "$tmp"/kc/*-sm_80-* "$tmp"/kc/*-sm_89-*
    tar cJf .kcache.tar.xz -C "$tmp" kc
    rm -rf "$tmp"
    echo ".kcache.tar.xz: $(du -h .kcache.tar.xz | cut -f1), $(tar tJf .kcache.tar.xz | grep -c cubin) cubins"
elif [ -f .kcache.tar.xz ]; then
    mkdir -p /tmp/atom-kcache && tar xJf .kcache.tar.xz -C /tmp/atom-kcache --strip-components=1
    export VLLM_ATOM_KERNEL_CACHE=/tmp/atom-kcache
else
    echo "kernel_cache.sh: no .kcache.tar.xz here (kernels compile on first use)" >&2
fi
