"""Build and install galore_kernels.

`pip install --no-build-isolation -e .` installs the package against the torch already in the
environment (isolation would pull a second, multi-gigabyte torch into a temporary build env).
"""
from setuptools import find_packages, setup

setup(
    name="galore_kernels",
    version="0.1.0",
    description="Kernel-accelerated GaLore (gradient low-rank projection) for PyTorch",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["galore_kernels", "galore_kernels.*"]),
    install_requires=[
        # 2.11 is the oldest torch we test (the GPU machines); 2.13 is CI's.
        "torch>=2.11",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            # The parity oracle. 1.0 is the only release and the one whose behaviour we match.
            "galore-torch==1.0",
            # galore-torch imports transformers (adamw.py) and bitsandbytes (its package __init__);
            # the quantized-layer tests use bitsandbytes' real 8-bit/4-bit modules on the CPU.
            "transformers>=4.46",
            "bitsandbytes>=0.45",
        ],
    },
)
