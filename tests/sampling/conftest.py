"""Fixtures of the sampling tests."""

from __future__ import annotations

import contextlib

import pytest

from fastguide.sampling import cuda_graphs


class ReplayingGraph:
    """A CPU stand-in for a captured CUDA graph: replay() runs the captured calls again."""

    def __init__(self, step):
        self.step = step

    def replay(self):
        self.step()


@pytest.fixture
def cpu_graphs(monkeypatch) -> list:
    """CUDA-graph capture stood in for on CPU: the capture/replay bookkeeping (static
    buffers, noise drawn inside from the graph's own generator, x_T and conditioning copied
    in per call, graphs reused)
    runs as on CUDA, so a step that read anything but the static buffers would give a
    replay wrong samples. Returns the list of captured steps, one per graph."""
    captured = []
    monkeypatch.setattr(cuda_graphs, "GRAPH_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(cuda_graphs, "side_stream", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cuda_graphs, "graph_pool", lambda: None)
    monkeypatch.setattr(cuda_graphs, "GRAPH_SAFE_GENERATORS", True)  # as CUDA builds of torch have it
    monkeypatch.setattr(
        cuda_graphs, "capture_graph", lambda step, pool, generator=None: captured.append(step) or ReplayingGraph(step)
    )
    return captured
