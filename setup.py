"""Builds offload._native (pybind11, C++17, no torch headers, no CUDA).

liburing is linked statically when its header and liburing.a are found (CPATH / LIBRARY_PATH are honoured,
as are OFFLOAD_URING_INCLUDE / OFFLOAD_URING_LIB); without them the store uses its thread-pool backend and
this build says so. OFFLOAD_NO_URING=1 forces the thread-pool build, OFFLOAD_SANITIZE=1 adds ASan+UBSan.
"""
import glob
import os
import sys

from setuptools import setup
from pybind11.setup_helpers import Pybind11Extension, build_ext


def _search_dirs(env_names, defaults):
    dirs = []
    for name in env_names:
        dirs += [d for d in os.environ.get(name, "").split(os.pathsep) if d]
    return dirs + defaults


def find_liburing():
    """Returns (include_dir, path_to_liburing.a) or None."""
    if os.environ.get("OFFLOAD_NO_URING") == "1":
        return None
    incs = _search_dirs(["OFFLOAD_URING_INCLUDE", "CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH"],
                        ["/usr/include", "/usr/local/include"])
    libs = _search_dirs(["OFFLOAD_URING_LIB", "LIBRARY_PATH"],
                        ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"])
    inc = next((d for d in incs if os.path.exists(os.path.join(d, "liburing.h"))), None)
    lib = next((os.path.join(d, "liburing.a") for d in libs if os.path.exists(os.path.join(d, "liburing.a"))), None)
    return (inc, lib) if inc and lib else None


sources = sorted(glob.glob("csrc/*.cpp"))
define_macros = []
extra_objects = []
include_dirs = ["csrc"]
uring = find_liburing()
if uring:
    include_dirs.append(uring[0])
    extra_objects.append(uring[1])
    define_macros.append(("OFFLOAD_HAVE_URING", "1"))
    print(f"offload: io_uring backend enabled (static {uring[1]})", file=sys.stderr)
else:
    print("offload: WARNING: liburing.h / liburing.a not found: building the thread-pool store backend only "
          "(install liburing-dev for io_uring)", file=sys.stderr)

compile_args = ["-O3", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"]
link_args = ["-pthread"]
if os.environ.get("OFFLOAD_SANITIZE") == "1":
    compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    link_args += ["-fsanitize=address,undefined"]

ext = Pybind11Extension(
    "offload._native",
    sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_objects=extra_objects,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
