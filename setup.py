"""Builds the package and its C++ extension `cancerllm._C` (the data loader, the CPU decoding kernels).

`kernels/` lives at the top level (docs/design.md) but installs as `cancerllm.kernels`: the bare name `kernels`
collides with a PyPI package. The extension includes no torch headers, so it survives torch upgrades.
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

sources = sorted(glob("csrc/*.cpp"))
ext_modules = [
    Pybind11Extension(
        "cancerllm._C",
        sources,
        include_dirs=["csrc"],
        cxx_std=17,
        # OpenMP for the decoding kernels' threads: the libgomp torch loads, so they are torch's.
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
] if sources else []

setup(
    packages=find_packages(include=["cancerllm", "cancerllm.*"]) + ["cancerllm.kernels"],
    package_dir={"cancerllm.kernels": "kernels"},
    package_data={"cancerllm.tasks": ["*.json", "*.txt"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
