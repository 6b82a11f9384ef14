"""fastmesh's benchmark harness and load generators (see benchmarks/README.md).

Run from a checkout, `python -m benchmarks ...` puts the checkout first on sys.path, where
`fastmesh/` is the uncompiled source tree unless it was installed in place (`pip install -e`).
Then the installed, compiled fastmesh must win: drop the checkout from the search path for
`fastmesh` imports (this package is already imported, so its own submodules still load).
"""
import os as _os
import sys as _sys

_REPO = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_core = _os.path.join(_REPO, "fastmesh", "_core")
if _os.path.isdir(_core) and not any(n.endswith(".so") for n in _os.listdir(_core)):
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _REPO]
