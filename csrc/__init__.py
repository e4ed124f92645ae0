"""CUDA C++ sources of the ``cuda`` backend, installed as package data so that
fastguide.ops.extension can build them just in time; see csrc/README.md."""
