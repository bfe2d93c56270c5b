"""Package layout (everything else is in pyproject.toml).

The kernel sources stay in the top-level cuda/ (the docs and cuda/NOTES.md refer to it); wheels
and ``pip install .`` carry every cuda/*.cu and *.cuh as ``vllm_atom/_cuda``, where
`vllm_atom.kernels._loader` looks first. pyproject.toml cannot say this: its
``packages.find`` does not combine with a package mapped from another directory.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["vllm_atom*"]) + ["vllm_atom._cuda"],
    package_dir={"vllm_atom._cuda": "cuda"},
    package_data={"vllm_atom._cuda": ["*.cu", "*.cuh"]},
)
