"""Build and install galore_kernels (the library) and galore_train (the bundled trainer, in python/).

`pip install --no-build-isolation -e .` installs both against the torch already in the environment
(isolation would pull a second, multi-gigabyte torch into a temporary build environment).
"""
from setuptools import find_packages, setup

TRAIN_REQUIRES = [
    "transformers>=5.0",  # the prepared tokenizer is saved in transformers 5 format
    "tokenizers>=0.20",
    "accelerate>=1.0",  # transformers' quantized (bitsandbytes) loading path needs it
    "bitsandbytes>=0.45",  # 8-bit loading and AdamW8bit; >= 0.45 runs on the CPU
    "safetensors>=0.4",
    "huggingface_hub>=0.24",
    "pyyaml>=6",
    "tqdm>=4.66",
    "matplotlib>=3.8",  # loss.png
]
TEST_REQUIRES = [
    "pytest>=8",
    "pytest-benchmark>=4",
    # The parity oracle: 1.0 is galore-torch's only release, the behaviour GaLoreAdamW matches.
    "galore-torch==1.0",
]

setup(
    name="galore_kernels",
    version="0.1.0",
    description="Kernel-accelerated GaLore (gradient low-rank projection) for PyTorch, with a bundled trainer",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["galore_kernels", "galore_kernels.*"]) + ["galore_train"],
    package_dir={"galore_train": "python/galore_train"},
    install_requires=[
        # 2.11 is the oldest torch we test (the GPU machines); 2.13 is CI's.
        "torch>=2.11",
    ],
    extras_require={
        "train": TRAIN_REQUIRES,
        "test": TRAIN_REQUIRES + TEST_REQUIRES,
    },
    entry_points={"console_scripts": ["galore-train=galore_train.cli:main"]},
)
