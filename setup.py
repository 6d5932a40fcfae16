"""Build and install galore_kernels (the library) and galore_train (the bundled trainer, in python/).

`pip install --no-build-isolation -e .` installs both against the torch already in the environment
(isolation would pull a second, multi-gigabyte torch into a temporary build environment).

It also builds the optional native extension galore_kernels/_C.so (csrc/, CMakeLists.txt) with CMake
into build/cmake (reused: a rebuild with no source change compiles nothing). The library is a plain
shared library of torch ops that Python loads with torch.ops.load_library(), not a Python module.
GALORE_KERNELS_BUILD_NATIVE: unset = build, and on failure warn and install without it (the package
runs on its pure-PyTorch reference path); 0 = do not build (and remove an in-place copy); 1 = build,
a failure is an error (CI compile checks). The build's output is in build/galore_native_build.log.
"""
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

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

ROOT = os.path.dirname(os.path.abspath(__file__))
NATIVE_EXT = "galore_kernels._C"
NATIVE_ENV = "GALORE_KERNELS_BUILD_NATIVE"
CMAKE_BUILD_DIR = os.path.join(ROOT, "build", "cmake")
NATIVE_LOG = os.path.join(ROOT, "build", "galore_native_build.log")


class NativeBuildError(RuntimeError):
    pass


def _tool(name):
    """`name` on PATH, or next to this Python (a venv's bin/, where pip installs cmake and ninja)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return shutil.which(name) or (here if os.access(here, os.X_OK) else None)


def _native_build_check():
    """galore_kernels/native_build_check.py, loaded by its path (the package is not importable yet)."""
    import importlib.util

    path = os.path.join(ROOT, "galore_kernels", "native_build_check.py")
    spec = importlib.util.spec_from_file_location("galore_native_build_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _replace_file(src, dst):
    """Copy src over dst atomically, and not at all when dst is already identical.

    Never rewrites a library in place: a running process that has it loaded would crash.
    """
    if os.path.exists(dst) and filecmp.cmp(src, dst, shallow=False):
        return
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


class CMakeBuildExt(build_ext):
    """Builds the native extension with CMake (CMakeLists.txt); a failure is a warning unless asked."""

    def run(self):
        self._inplace_requested = bool(self.inplace or self.editable_mode)
        super().run()

    def get_ext_filename(self, fullname):
        # A plain shared library, not a Python module: no ABI tag (galore_kernels/_C.so).
        if fullname in (NATIVE_EXT, NATIVE_EXT.rpartition(".")[2]):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extensions(self):
        for ext in list(self.extensions):
            if ext.name != NATIVE_EXT:
                self.build_extension(ext)
                continue
            mode = os.environ.get(NATIVE_ENV, "").strip()
            if mode == "0":
                print(f"galore_kernels: {NATIVE_ENV}=0, not building the native extension", file=sys.stderr)
                self._drop(ext)
                continue
            try:
                self._build_native(ext)
            except Exception as exc:  # any failure: install without it
                if mode == "1":
                    raise NativeBuildError(f"galore_kernels: native extension build failed ({NATIVE_ENV}=1): {exc}") from exc
                # The details go to stderr (pip shows them with -v); the warning itself reaches the
                # user even under `pip install -q` (pip forwards the build backend's Python warnings).
                print(f"galore_kernels: native extension build failed: {exc}", file=sys.stderr)
                summary = str(exc).splitlines()[0]
                warnings.warn(
                    f"galore_kernels: the native extension galore_kernels/_C.so was NOT built ({summary}). "
                    "The package installs without it and runs on its pure-PyTorch reference path. "
                    f"Why: {NATIVE_LOG} or `pip install -v`. {NATIVE_ENV}=1 makes this an error, "
                    f"{NATIVE_ENV}=0 skips the build.",
                    stacklevel=1,
                )
                self._drop(ext)

    def _drop(self, ext):
        """Install without the extension, and remove an in-place copy that would be stale."""
        self.extensions.remove(ext)
        if getattr(self, "_inplace_requested", False):
            stale = os.path.join(ROOT, *ext.name.split(".")) + ".so"
            if os.path.exists(stale):
                os.remove(stale)

    def _build_native(self, ext):
        cmake = _tool("cmake")
        if cmake is None:
            raise NativeBuildError("cmake not found (install cmake >= 3.18, e.g. `pip install cmake`)")
        try:
            import torch
        except ImportError as exc:
            raise NativeBuildError(f"torch is not importable in the build environment ({exc}); "
                                   "install torch first and use `pip install --no-build-isolation`") from exc
        ninja = _tool("ninja")
        configure = [
            cmake, "-S", ROOT, "-B", CMAKE_BUILD_DIR,
            *(["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        build = [cmake, "--build", CMAKE_BUILD_DIR]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]

        # Configure only when the configuration changed (a new torch, another Python, ...); otherwise
        # the build tool alone decides what is out of date (it re-runs CMake if CMakeLists.txt changed).
        stamp_file = os.path.join(CMAKE_BUILD_DIR, "galore_configure.json")
        stamp = {"configure": configure, "torch": torch.__version__}
        cache = os.path.join(CMAKE_BUILD_DIR, "CMakeCache.txt")
        try:
            with open(stamp_file) as f:
                configured = json.load(f) == stamp and os.path.exists(cache)
        except (OSError, ValueError):
            configured = False
        os.makedirs(CMAKE_BUILD_DIR, exist_ok=True)
        start = time.monotonic()
        with open(NATIVE_LOG, "w") as log:
            if not configured:
                if os.path.exists(cache):
                    os.remove(cache)  # a stale cache (other generator, other torch) would fail or mislead
                self._run(configure, log)
                with open(stamp_file, "w") as f:
                    json.dump(stamp, f)
            self._run(build, log)
        built = os.path.join(CMAKE_BUILD_DIR, "_C.so")
        if not os.path.exists(built):
            raise NativeBuildError(f"the build did not produce {built}")
        copies = _native_build_check().own_cxx_runtime_symbols(built)  # against the libstdc++ torch maps here
        if copies:
            raise NativeBuildError(
                f"{built} carries its own copy of the C++ runtime ({len(copies)} libstdc++ symbols defined in it, "
                f"e.g. {copies[0]}): this compiler links libstdc++ statically, and that copy crashes inside "
                "torch's process as soon as an error message formats a number. CMakeLists.txt links the "
                "libstdc++.so torch uses, but this one did not take: build with a compiler that has a shared "
                "libstdc++ (`rm -rf build/cmake`, then reinstall with e.g. CXX=/usr/bin/g++).")
        _replace_file(built, self.get_ext_fullpath(ext.name))
        print(f"galore_kernels: native extension ready ({time.monotonic() - start:.1f} s)", file=sys.stderr)

    @staticmethod
    def _run(cmd, log):
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, check=False, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.write(proc.stdout)
        log.flush()
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-25:])
            raise NativeBuildError(f"`{os.path.basename(cmd[0])} {cmd[1]}` failed with exit code {proc.returncode}\n{tail}")

    def copy_extensions_to_source(self):
        # Editable installs: put the library into the source package, atomically and only if changed.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            _replace_file(regular_file, inplace_file)


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
        # The fused step's kernels (CUDA; the CPU tests run them in Triton's interpreter). 3.6 is
        # what the GPU machines have; Triton ships wheels for Linux x86_64 (and aarch64) only.
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={
        "train": TRAIN_REQUIRES,
        "test": TRAIN_REQUIRES + TEST_REQUIRES,
    },
    entry_points={"console_scripts": ["galore-train=galore_train.cli:main"]},
    # One placeholder: CMakeBuildExt builds it from CMakeLists.txt.
    ext_modules=[Extension(NATIVE_EXT, sources=[])],
    cmdclass={"build_ext": CMakeBuildExt},
)
