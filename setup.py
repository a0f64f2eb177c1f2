"""Builds the private native core, offload._C, from csrc/ with the machine's compiler.

The core (csrc/core) includes no Python headers; csrc/bindings.cpp is the one file that exposes it.
"""

from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))

ext = Pybind11Extension(
    "offload._C",
    SOURCES,
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-Wall", "-Wextra", "-fvisibility=hidden", "-fno-math-errno"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
