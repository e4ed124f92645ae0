"""Triton kernels, installed as ``fastguide.kernels``.

Only ``fastguide.ops`` imports these modules. Each module holds the ``@triton.jit``
kernels of one op and one launch function per kernel; the launchers check nothing
(fastguide.ops validated the arguments already).

Imported as top-level ``kernels`` -- which happens whenever the checkout's root is on
``sys.path``: ``python -c``/``python -m fastguide``/``python -m pytest`` run from the root,
pytest's rootdir insertion -- this folder would shadow Hugging Face's ``kernels``
package. diffusers and transformers decide that package is available from
``importlib.util.find_spec("kernels")`` (which finds this folder without running it)
plus the installed distribution's version (which finds the real one), then run
``from kernels import CUDAProperties, ...`` and fail on this folder. So under that name
this module loads whatever ``kernels`` the rest of the import path holds in its place.
When there is none it must not raise: transformers' availability check imports the name
once ``find_spec`` found it and lets the error through (every diffusers model import
failed on a machine with peft and without Hugging Face's ``kernels``). It leaves instead
an empty module with no ``__file__``, no ``__version__`` and an empty ``__path__``: what
a PEP 420 namespace folder looks like, which transformers counts as "not installed" and
diffusers rejects for want of a distribution; ``from kernels import X`` then raises
ImportError and ``import kernels.x`` ModuleNotFoundError, as with no such package.
"""

if __name__ == "kernels":
    import importlib.util
    import os
    import sys

    def _import_shadowed_kernels() -> bool:
        """Put the ``kernels`` that sys.path holds beyond this checkout into sys.modules;
        False when there is none.

        The import system returns ``sys.modules["kernels"]`` once this module has run, so
        replacing the entry makes ``import kernels`` give the other package.
        """
        here = os.path.dirname(os.path.realpath(__file__))
        checkout = os.path.dirname(here)
        path = [entry for entry in sys.path if not isinstance(entry, str) or os.path.realpath(entry or ".") != checkout]
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec("kernels", path) if find_spec is not None else None
            if spec is None or (spec.origin is not None and os.path.dirname(os.path.realpath(spec.origin)) == here):
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules["kernels"] = module
            spec.loader.exec_module(module)
            return True
        return False

    if not _import_shadowed_kernels():
        # The empty stand-in described above: nothing of this folder stays reachable.
        for _name in [name for name in globals() if not name.startswith("__")]:
            del globals()[_name]
        del _name
        del __file__
        __path__ = []
