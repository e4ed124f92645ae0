"""Sampling: noise schedules, solvers (per-step scalars), guidance specs, the sampling
loop and its CUDA-graph capture. Everything here computes scalars and calls fastguide.ops."""
