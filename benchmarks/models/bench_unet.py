"""UNet forward: fastguide's fused model vs the same weights on plain PyTorch ops (ADM's
unfused forward, tools/adm_baseline.py) vs torch.compile of that (default mode, and on GPU
max-autotune, the target's peer, whose compile takes minutes: gpu.sh leaves it to a call
of its own, `fastguide bench -k "unet and max-autotune"`).

CPU set: the "compact" preset at batch 2×16 and the adm64 configuration at batch 2×1
(adm64 at 2×16 takes minutes per forward on 2 cores), 3 rounds each. GPU set: adm64 at
batch 2×64, fp16 (ADM's use_fp16) and bf16 autocast, through the `record` fixture: call
time, device time alone (graph replay after an L2 flush) and back-to-back calls, and the
% of the matmul rate, against the FLOPs of the forward's matmuls and convolutions as
torch's FlopCounterMode counts them on the plain forward (the same math as every row;
fastguide's fused attention is a custom op that the counter cannot see into).
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.conftest import DEVICE, compiled, no_recompiles
from fastguide.models.configs import create_model, unet_config
from tools.adm_baseline import plain_unet


def _model_and_inputs(preset: str, pairs: int, dtype: torch.dtype):
    flags = unet_config(preset)
    flags["use_fp16"] = dtype == torch.float16
    with torch.device(DEVICE):
        model = create_model(**flags).eval()
    g = torch.Generator().manual_seed(0)
    batch = 2 * pairs
    x = torch.randn((batch, model.in_channels, model.image_size, model.image_size), generator=g).to(DEVICE)
    t = torch.randint(0, 1000, (batch,), generator=g).to(DEVICE)
    y = None if model.num_classes is None else torch.randint(0, model.num_classes, (batch,), generator=g).to(DEVICE)
    return model, x, t, y


def _forward(impl, model, x, t, y, dtype):
    """One no-grad forward of `impl` on (x, t, y), under bf16 autocast where dtype asks."""
    if impl.startswith("torch.compile"):
        mode = "max-autotune" if impl.endswith("max-autotune") else None
        compiled_plain = compiled(plain_unet, mode=mode)
        forward = lambda *a: compiled_plain(model, *a)  # noqa: E731
    else:
        forward = model if impl == "fastguide" else lambda *a: plain_unet(model, *a)

    def run():
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return forward(x, t, y)

    return run


def _run_cpu(benchmark, impl, preset, pairs, dtype):
    model, x, t, y = _model_and_inputs(preset, pairs, dtype)
    step = _forward(impl, model, x, t, y, dtype)
    step()  # warm-up / compile
    with no_recompiles():
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)


def _run_gpu(record, impl, preset, pairs, dtype):
    model, x, t, y = _model_and_inputs(preset, pairs, dtype)
    with FlopCounterMode(display=False) as counter:
        _forward("eager", model, x, t, y, dtype)()
    record(_forward(impl, model, x, t, y, dtype), flops=counter.get_total_flops())


@pytest.mark.parametrize("impl", ["fastguide", "eager", "torch.compile"])
@pytest.mark.parametrize("preset, pairs", [("compact", 16), ("adm64", 1)], ids=["compact-2x16", "adm64-2x1"])
def test_unet_forward_cpu(benchmark, impl, preset, pairs):
    if DEVICE.type != "cpu":
        pytest.skip("CPU set")
    _run_cpu(benchmark, impl, preset, pairs, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastguide", "eager", "torch.compile", "torch.compile-max-autotune"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_unet_forward_gpu(record, impl, dtype):
    _run_gpu(record, impl, "adm64", 64, dtype)
