# Sourced by the GPU-machine scripts, after .devbundle/vllm_env.sh: makes this checkout's plugin an
# installed distribution (vLLM finds plugins through entry points in every process it starts) and
# puts the checkout first on PYTHONPATH.
mkdir -p /tmp/plug/vllm_atom-0.dist-info
printf 'Metadata-Version: 2.1\nName: vllm-atom\nVersion: 0\n' > /tmp/plug/vllm_atom-0.dist-info/METADATA
printf '[vllm.general_plugins]\natom = vllm_atom.plugin:register\n' > /tmp/plug/vllm_atom-0.dist-info/entry_points.txt
export PYTHONPATH=$PWD:/tmp/plug:${PYTHONPATH:-}
# the precompiled kernels, if .kcache.tar.xz was carried (tests/gpu/kernel_cache.sh)
[ -n "${VLLM_ATOM_KERNEL_CACHE:-}" ] || source tests/gpu/kernel_cache.sh
