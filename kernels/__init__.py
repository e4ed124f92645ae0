"""Triton kernels, installed as ``fastguide.kernels``.

Only ``fastguide.ops`` imports these modules. Each module holds the ``@triton.jit``
kernels of one op and one launch function per kernel; the launchers check nothing
(ops.py validated the arguments already).
"""
