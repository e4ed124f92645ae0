"""CUDA-graph capture of the sampling loop, in three small functions so that a CPU test
can stand in for them (tests/sampling/test_sampler.py checks the replay bookkeeping).

A captured run holds one graph per stretch of model calls that the host need not step
into (the whole loop of a deterministic sampler; see GuidedSampler._segments), all in one
memory pool: safe because they always replay in capture order, one at a time. Each
call's scalars are baked into its own kernel launches inside the graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

# Device types whose loops can be captured.
GRAPH_DEVICE_TYPES = ("cuda",)


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a fresh stream that waits for, and is then waited on by, the
    current one (torch.cuda.graph asks for a warm-up off the capture stream)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def graph_pool():
    """A memory pool shared by the graphs of one captured run."""
    return torch.cuda.graph_pool_handle()


def capture_graph(fn: Callable[[], object], pool) -> "torch.cuda.CUDAGraph":
    """``fn`` captured as one CUDA graph in ``pool``."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph
