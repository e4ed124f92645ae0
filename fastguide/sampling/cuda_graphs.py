"""CUDA-graph capture of the sampling loop, in three small functions so that a CPU test
can stand in for them (tests/sampling/test_sampler.py checks the replay bookkeeping).

A captured run holds one graph per stretch of model calls that the host need not step
into (the whole loop, unless a callback must see each call or the noise comes from a
host-side generator; see GuidedSampler._segments), all in one memory pool: safe because
they always replay in capture order, one at a time. Each call's scalars are baked into
its own kernel launches inside the graph.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import itertools
import numbers
import types
from collections.abc import Callable, Iterable, Iterator

import torch

# Device types whose loops can be captured.
GRAPH_DEVICE_TYPES = ("cuda",)
# Whether this torch's graphs replay draws from a generator registered with them
# (CUDAGraph.register_generator_state: a replay reads the generator's seed and offset and
# advances the offset as the captured draws would have). Then a captured loop draws its
# noise inside the graph; else before each replay, on the host's side.
GRAPH_SAFE_GENERATORS = hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def draws_inside(generator: torch.Generator | None, device: torch.device) -> bool:
    """Whether a captured loop on ``device`` draws its noise inside its graph: from a
    generator on that device (the caller's, or the device's default), when the graphs can
    hold one. A CPU generator for CUDA samples draws on the host, outside."""
    on_device = generator is None or generator.device.type == device.type
    return GRAPH_SAFE_GENERATORS and on_device


def default_generator(device: torch.device) -> torch.Generator:
    """The generator torch draws from on ``device`` when none is given."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a fresh stream that waits for, and is then waited on by, the
    current one (torch.cuda.graph asks for a warm-up off the capture stream)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            yield
    finally:  # a warm-up that raised leaves no side-stream work unordered
        current.wait_stream(side)


def modules_called(network: object, depth: int = 3) -> tuple[list[torch.nn.Module], bool]:
    """The modules whose weights a call of ``network`` reads, as far as they can be seen,
    and whether some of them cannot be: a module itself; a bound method's object; a
    functools.partial's function and arguments; a function's closure cells and the globals
    its code loads (the usual ``lambda x, t, y: unet(x, t, y)``), the functions among them
    followed ``depth`` calls deep and lists, tuples and dicts among them looked into. An
    object of another kind (``lambda ...: wrapper.model(...)`` for a wrapper that is no
    module) hides what it holds: opaque."""
    if network is None:
        return [], False
    if isinstance(network, torch.nn.Module):
        return [network], False
    if isinstance(network, types.MethodType):
        return modules_called(network.__self__, depth)
    if isinstance(network, functools.partial):
        values = [network.func, *network.args, *network.keywords.values()]
    elif isinstance(network, types.FunctionType):
        cells = [cell.cell_contents for cell in network.__closure__ or () if _filled(cell)]
        named = network.__globals__
        values = cells + [named[name] for name in _globals_loaded(network.__code__) if name in named]
    else:
        return [], True
    found: list[torch.nn.Module] = []
    opaque = False
    for value in values:
        if isinstance(value, (list, tuple)):
            value_found = [item for item in value if isinstance(item, torch.nn.Module)]
            value_opaque = False
        elif isinstance(value, dict):
            value_found = [item for item in value.values() if isinstance(item, torch.nn.Module)]
            value_opaque = False
        elif isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
            if depth == 0:
                continue
            value_found, value_opaque = modules_called(value, depth - 1)
        elif isinstance(value, torch.nn.Module):
            value_found, value_opaque = [value], False
        elif isinstance(value, _TRANSPARENT):
            continue
        else:
            value_found, value_opaque = [], True
        found += value_found
        opaque = opaque or value_opaque
    return found, opaque


# What a function may name that holds no module: Python modules, classes, builtins, values.
_TRANSPARENT = (
    types.ModuleType,
    type,
    types.BuiltinFunctionType,
    torch.Tensor,
    numbers.Number,
    str,
    bytes,
    type(None),
    torch.dtype,
    torch.device,
)


@functools.lru_cache(maxsize=256)
def _globals_loaded(code: types.CodeType) -> tuple[str, ...]:
    """The global names ``code`` and the functions defined in it load (co_names holds
    attribute names too: ``h.model`` names "model")."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names.update(_globals_loaded(constant))
    return tuple(sorted(names))


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a cell not yet assigned
        return False
    return True


def weights_fingerprint(modules: Iterable[torch.nn.Module]) -> tuple:
    """Where each module's parameters and buffers live (address, dtype, shape), and whether
    it is training. A graph reads a weight at the address it was captured with, so weights
    that moved (``model.half().float()``, offloading and back, ``load_state_dict(...,
    assign=True)``) need a new capture; an in-place update keeps the address and needs none."""
    return tuple(
        (
            module.training,
            *((t.data_ptr(), t.dtype, t.shape) for t in itertools.chain(module.parameters(), module.buffers())),
        )
        for module in modules
    )


def autocast_state(device: torch.device) -> tuple[bool, torch.dtype | None]:
    """Whether autocast is on for ``device``'s type, and to which dtype: what a capture runs
    under is part of what it is (a replay outside autocast must not give autocast's precision)."""
    if not torch.is_autocast_enabled(device.type):
        return (False, None)
    return (True, torch.get_autocast_dtype(device.type))


@contextlib.contextmanager
def capturing_on(device: torch.device) -> Iterator[None]:
    """Around a warm-up and capture, or a replay: ``device`` current (the kernels launch on
    the current device), and the caller's autocast with its cast cache off. A cached cast
    of a weight lives outside the graph's pool and is freed when the caller's autocast block
    ends, while the graph would go on reading it (PyTorch's make_graphed_callables refuses
    cached autocast for this reason)."""
    enabled, dtype = autocast_state(device)
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        if enabled:
            stack.enter_context(torch.autocast(device.type, dtype=dtype, cache_enabled=False))
        yield


def graph_pool():
    """A memory pool shared by the graphs of one captured run."""
    return torch.cuda.graph_pool_handle()


def capture_graph(fn: Callable[[], object], pool, generator: torch.Generator | None = None) -> "torch.cuda.CUDAGraph":
    """``fn`` captured as one CUDA graph in ``pool``, on a stream of the current device
    (torch.cuda.graph's own default stream is made once, on the device current at the
    process's first capture); its draws from ``generator`` (when given) replay from that
    generator's state at the time of each replay."""
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream()):
        fn()
    return graph
