"""fastmesh: a sidecar data plane with a Cython core on uvloop."""
__version__ = "0.1.0"
