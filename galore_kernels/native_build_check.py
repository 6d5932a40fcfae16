"""Whether a built ``_C.so`` carries its own copy of the C++ runtime.

A compiler that links libstdc++ statically by default (the GPU machines' image: a GCC built with
-static-libstdc++ and no libstdc++.so of its own) puts a second copy of the runtime inside the
library. Its locale facets are never initialised in torch's process, and formatting a number into
an error message then crashes it (2026-11-28, H200). CMakeLists.txt links the shared libstdc++ that
torch uses; setup.py runs this check on the result, and tests/test_native_build.py on the installed
library.

Standard library only, no package imports: setup.py loads this file by path before the package is
importable, and CMakeLists.txt runs it as a script (``python native_build_check.py``), which imports
torch and prints the libstdc++ that torch's process maps.
"""
from __future__ import annotations

import shutil
import subprocess
from typing import Optional

STRONG_TYPES = set("TDBR")  # defined code and data; weak (W, V) and unique (u) instantiations are fine


def mapped_libstdcxx() -> Optional[str]:
    """The libstdc++ shared library this process has mapped (torch's, once torch is imported); None
    without one (libc++, not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and "libstdc++.so" in fields[5]:
                    return fields[5].strip()
    except OSError:
        return None
    return None


def dynamic_symbols(library: str, strong_only: bool) -> Optional[set]:
    """Names of the symbols ``library`` defines in its dynamic symbol table (what a stripped library
    keeps too), without version suffixes; None when binutils' nm is not installed."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    out = subprocess.run([nm, "-D", "--defined-only", library], check=False, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True).stdout
    names = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and (not strong_only or fields[-2] in STRONG_TYPES):
            names.add(fields[-1].split("@")[0])
    return names


def own_cxx_runtime_symbols(library: str, runtime: Optional[str] = None) -> list:
    """The C++ runtime symbols that ``library`` defines itself (sorted): the strong definitions it
    shares with ``runtime`` (default: the libstdc++ this process maps). Empty when it uses the shared
    runtime, and when nm or a mapped libstdc++ is missing (nothing to compare with)."""
    runtime = runtime or mapped_libstdcxx()
    if runtime is None:
        return []
    ours, theirs = dynamic_symbols(library, strong_only=True), dynamic_symbols(runtime, strong_only=False)
    if ours is None or theirs is None:
        return []
    return sorted(ours & theirs)


if __name__ == "__main__":
    import torch  # noqa: F401  # maps torch's libstdc++ into this process

    print(mapped_libstdcxx() or "", end="")
