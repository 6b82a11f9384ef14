"""Build the Cython data world (fastmesh/_core/*.pyx) into extension modules.

FASTMESH_DEBUG=1 builds a debug flavour: C assertions on (no -DNDEBUG), Cython line
tracing (profilers and coverage see .pyx lines), bounds checks, and the leak counters
in fastmesh._core.debug compiled in (FASTMESH_DEBUG macro).
"""
import os
from glob import glob

from setuptools import Extension, setup
from Cython.Build import cythonize

DEBUG = os.environ.get("FASTMESH_DEBUG", "") not in ("", "0")

compile_args = ["-O2", "-Wall", "-Wno-unused-function", "-Wsign-compare"]
# Release builds carry no debug info: Python's own CFLAGS add -g (4 MB of wheel for nothing
# a user runs); the symbol table stays, so backtraces still name functions
link_args = ["-Wl,--strip-debug"]
macros = []
directives = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "embedsignature": True,
}
if DEBUG:
    compile_args = ["-O0", "-g", "-Wall", "-Wno-unused-function", "-UNDEBUG"]
    link_args = []
    macros = [("FASTMESH_DEBUG", "1"), ("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    directives.update(boundscheck=True, wraparound=True, linetrace=True)
else:
    macros = [("FASTMESH_DEBUG", "0")]

# The io_uring engine links liburing statically (the wheel stays self-contained: auditwheel
# finds no liburing.so to bundle or to miss). Without liburing-dev the module is left out and
# `engine: auto` falls back to epoll, saying why.
LIBURING_A = os.environ.get("FASTMESH_LIBURING_A", "")
if not LIBURING_A:
    for cand in ("/usr/lib/x86_64-linux-gnu/liburing.a", "/usr/lib/aarch64-linux-gnu/liburing.a",
                 "/usr/lib64/liburing.a", "/usr/lib/liburing.a", "/usr/local/lib/liburing.a"):
        if os.path.exists(cand):
            LIBURING_A = cand
            break


def _extension(path):
    name = os.path.splitext(os.path.basename(path))[0]
    objects = [LIBURING_A] if name == "engine_uring" else []
    return Extension("fastmesh._core." + name, [path], extra_compile_args=compile_args,
                     extra_link_args=link_args, extra_objects=objects, define_macros=macros)


extensions = [
    _extension(path) for path in sorted(glob("fastmesh/_core/*.pyx"))
    if LIBURING_A or not path.endswith("engine_uring.pyx")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        build_dir="build/cython-debug" if DEBUG else "build/cython",
    ),
)
