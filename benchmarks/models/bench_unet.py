"""UNet forward: fastguide's fused model vs the same weights on plain PyTorch ops (ADM's
unfused forward, tools/adm_baseline.py) vs torch.compile of that (default mode, and on GPU
max-autotune, the target's peer, whose compile takes minutes: gpu.sh leaves it to a call
of its own, `fastguide bench -k "unet and max-autotune"`).

CPU set: the "compact" preset at batch 2×16 and the adm64 configuration at batch 2×1
(adm64 at 2×16 takes minutes per forward on 2 cores). GPU set: adm64 at batch 2×64,
fp16 (ADM's use_fp16) and bf16 autocast.
"""

import pytest
import torch

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


def _run(benchmark, impl, preset, pairs, dtype):
    model, x, t, y = _model_and_inputs(preset, pairs, dtype)
    if impl.startswith("torch.compile"):
        mode = "max-autotune" if impl.endswith("max-autotune") else None
        compiled_plain = compiled(plain_unet, mode=mode)
        forward = lambda *a: compiled_plain(model, *a)  # noqa: E731
    else:
        forward = model if impl == "fastguide" else lambda *a: plain_unet(model, *a)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step():
        with torch.no_grad(), autocast:
            out = forward(x, t, y)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    step()  # warm-up / compile
    if DEVICE.type == "cuda":  # the case's own peak, above what it holds before the timing
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    with no_recompiles():
        benchmark.pedantic(step, rounds=3 if DEVICE.type == "cpu" else 10, warmup_rounds=1)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_MB"] = (torch.cuda.max_memory_allocated() - held) / 2**20


@pytest.mark.parametrize("impl", ["fastguide", "eager", "torch.compile"])
@pytest.mark.parametrize("preset, pairs", [("compact", 16), ("adm64", 1)], ids=["compact-2x16", "adm64-2x1"])
def test_unet_forward_cpu(benchmark, impl, preset, pairs):
    if DEVICE.type != "cpu":
        pytest.skip("CPU set")
    _run(benchmark, impl, preset, pairs, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastguide", "eager", "torch.compile", "torch.compile-max-autotune"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_unet_forward_gpu(benchmark, impl, dtype):
    _run(benchmark, impl, "adm64", 64, dtype)
