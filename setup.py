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

extensions = [
    Extension(
        "fastmesh._core." + os.path.splitext(os.path.basename(path))[0],
        [path],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=macros,
    )
    for path in sorted(glob("fastmesh/_core/*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        build_dir="build/cython-debug" if DEBUG else "build/cython",
    ),
)
