"""CI: the installed fastguide._C (built by setup.py against a CUDA build of torch) loads
and registers a CUDA kernel for every fastguide_cuda op that fastguide.ops.cuda_backend calls.
Needs no GPU: loading and registration only. Run from outside the source tree."""

import torch

from fastguide.ops import extension

path = extension.prebuilt_path()
assert path is not None, "fastguide._C is not installed"
extension.load()
for op in (
    "guided_step",
    "group_norm_forward",
    "group_norm_backward",
    "layer_norm_forward",
    "gated_residual_layer_norm_forward",
    "layer_norm_backward",
):
    name = f"{extension.OPS_NAMESPACE}::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"
    print(getattr(torch.ops.fastguide_cuda, op).default._schema)
print(f"ok: {path} loads, every op has its CUDA kernel (torch {torch.__version__})")
