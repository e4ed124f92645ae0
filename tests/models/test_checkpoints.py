"""Checkpoint loading refuses what it cannot load faithfully, and says which file and why:
non-float tensors for float weights, directories, empty, truncated and foreign files, and
pickles of Python objects; the format is read from the content, not the suffix."""

import argparse
import traceback

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fastguide import load_checkpoint, save_state_dict
from fastguide.models.checkpoints import read_state_dict


class Tiny(nn.Module):
    """Float weights plus an integer buffer (as a step counter would be)."""

    def __init__(self, layers: int = 1):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(layers))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def write(state: dict[str, torch.Tensor], path) -> None:
    """safetensors for a .safetensors path, torch.save otherwise."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def no_weights_only_false_advice(error: BaseException) -> None:
    shown = "".join(traceback.format_exception(error))
    assert "weights_only=False" not in shown and "`weights_only` set to `False`" not in shown, shown


# --------------------------------------------------------------------------------------
# dtypes: int, bool and fp8 are not cast into float weights
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_non_float_tensors_for_float_weights_are_refused(tmp_path, suffix, dtype):
    model = Tiny()
    before = weights(model)
    state = weights(model)
    state["layers.0.weight"] = torch.ones(3, 3).to(dtype)
    path = tmp_path / f"quantised{suffix}"
    write(state, path)
    with pytest.raises(ValueError, match=rf"{path.name}.*layers\.0\.weight \({dtype}\)") as info:
        load_checkpoint(model, path)
    assert "layers.0.bias" not in str(info.value)
    for key, value in model.state_dict().items():  # nothing was written into the model
        assert torch.equal(value, before[key]), key


def test_the_first_few_offending_keys_are_named(tmp_path):
    model = Tiny(layers=4)
    state = {k: (v.to(torch.int8) if v.is_floating_point() else v) for k, v in weights(model).items()}
    torch.save(state, tmp_path / "ints.pt")
    with pytest.raises(
        ValueError,
        match=r"ints\.pt.*layers\.0\.weight \(torch\.int8\), layers\.0\.bias "
        r"\(torch\.int8\).* and 3 more",
    ):
        load_checkpoint(model, tmp_path / "ints.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_integer_buffers_and_other_float_dtypes_still_load(tmp_path, suffix):
    source = Tiny()
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in weights(source).items()}
    state["count"] = torch.tensor(7)
    path = tmp_path / f"bf16{suffix}"
    write(state, path)
    model = load_checkpoint(Tiny(), path)
    assert model.count.dtype == torch.int64 and int(model.count) == 7
    assert model.layers[0].weight.dtype == torch.float32
    torch.testing.assert_close(model.layers[0].weight, state["layers.0.weight"].float(), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_float_tensor_for_an_integer_buffer_is_refused(tmp_path, suffix):
    state = weights(Tiny())
    state["count"] = torch.tensor(3.7)  # load_state_dict would store 3
    path = tmp_path / f"float-count{suffix}"
    write(state, path)
    with pytest.raises(ValueError, match=r"floating tensors where the model's are not .*count \(torch.float32 into"):
        load_checkpoint(Tiny(), path)


class WithRunningTable(Tiny):
    """A model with a non-persistent buffer: no checkpoint holds it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_a_meta_model_whose_non_persistent_buffers_no_checkpoint_fills_is_refused(tmp_path):
    save_state_dict(WithRunningTable(), tmp_path / "weights.safetensors")
    with torch.device("meta"):
        model = WithRunningTable()
    with pytest.raises(ValueError, match="non-persistent buffers table are meta tensors"):
        load_checkpoint(model, tmp_path / "weights.safetensors")
    load_checkpoint(WithRunningTable(), tmp_path / "weights.safetensors")  # built on a device: loads


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(3, 3, bias=False)
        self.decode = nn.Linear(3, 3, bias=False)
        self.decode.weight = self.encode.weight


@pytest.mark.parametrize("on_meta", [False, True], ids=["cpu model", "meta model"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_tied_weights_save_and_load(tmp_path, suffix, on_meta):
    source = Tied()
    save_state_dict(source, tmp_path / f"tied{suffix}")
    with torch.device("meta" if on_meta else "cpu"):
        target = Tied()
    model = load_checkpoint(target, tmp_path / f"tied{suffix}")
    assert model.decode.weight is model.encode.weight  # still one tensor (assign gave two)
    assert isinstance(model.decode.weight, nn.Parameter) and not model.encode.weight.is_meta
    torch.testing.assert_close(model.encode.weight, source.encode.weight, rtol=0, atol=0)


class Labelled(nn.Module):
    """ADM's label table: ``rows`` rows, the last one the null class's where ``null_class``."""

    def __init__(self, rows, null_class=True):
        super().__init__()
        self.label_emb = nn.Embedding(rows, 4)
        self.null_class = null_class


def test_a_label_table_of_other_classes_is_named_as_such(tmp_path):
    save_state_dict(Labelled(5), tmp_path / "five.safetensors")
    with pytest.raises(ValueError, match=r"one more row: pass expand_label_table=True"):
        load_checkpoint(Labelled(6), tmp_path / "five.safetensors")
    assert load_checkpoint(Labelled(6), tmp_path / "five.safetensors", expand_label_table=True) is not None
    for expand in (False, True):  # expand_label_table adds one row, not six
        with pytest.raises(ValueError, match=r"label table has 5 rows, the model's 11: other classes"):
            load_checkpoint(Labelled(11), tmp_path / "five.safetensors", expand_label_table=expand)


def test_a_model_without_a_null_class_gets_no_row_appended(tmp_path):
    # Six classes and no null class: the appended row would pass as class 5, an average.
    save_state_dict(Labelled(5), tmp_path / "five.safetensors")
    with pytest.raises(ValueError, match=r"expand_label_table=True appends the null class's row"):
        load_checkpoint(Labelled(6, null_class=False), tmp_path / "five.safetensors", expand_label_table=True)
    with pytest.raises(ValueError, match=r"label table has 5 rows, the model's 6: other classes"):
        load_checkpoint(Labelled(6, null_class=False), tmp_path / "five.safetensors")


class DiTLabelled(nn.Module):
    """DiT's and SiT's label table, under its own name."""

    def __init__(self, classes):
        super().__init__()
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(classes, 4)
        self.null_class = True


def test_a_dits_label_table_expands_too_and_a_model_without_one_refuses_to(tmp_path):
    save_state_dict(DiTLabelled(5), tmp_path / "dit.safetensors")
    with pytest.raises(ValueError, match=r"one more row: pass expand_label_table=True"):
        load_checkpoint(DiTLabelled(6), tmp_path / "dit.safetensors")
    model = load_checkpoint(DiTLabelled(6), tmp_path / "dit.safetensors", expand_label_table=True)
    table = model.y_embedder.embedding_table.weight
    torch.testing.assert_close(table[5], table[:5].mean(0))
    save_state_dict(Tiny(), tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match=r"expand_label_table=True: the model has no label table"):
        load_checkpoint(Tiny(), tmp_path / "tiny.safetensors", expand_label_table=True)


def test_an_unconditional_checkpoint_in_a_conditional_model_says_so(tmp_path):
    class Conditional(nn.Module):
        def __init__(self, labelled):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)
            if labelled:
                self.label_emb = nn.Embedding(3, 1)

    save_state_dict(Conditional(False), tmp_path / "uncond.safetensors")
    with pytest.raises(ValueError, match=r"1 missing keys \(label_emb.weight\).*an unconditional checkpoint"):
        load_checkpoint(Conditional(True), tmp_path / "uncond.safetensors")
    save_state_dict(Conditional(True), tmp_path / "cond.safetensors")  # and the other way round
    with pytest.raises(ValueError, match=r"1 unexpected keys \(label_emb.weight\).*a class-conditional checkpoint"):
        load_checkpoint(Conditional(False), tmp_path / "cond.safetensors")


def test_a_dit_checkpoint_of_another_image_size_names_its_size(tmp_path):
    # DiT-XL/2 512's checkpoint into the 256 model: only "pos_embed (1, 1024, 1152) vs (1, 256, 1152)"
    from fastguide import DiT

    tiny = dict(patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4, num_classes=3)
    save_state_dict(DiT(input_size=16, **tiny), tmp_path / "dit16.safetensors")
    with pytest.raises(ValueError, match=r"pos_embed: .*position table is for input_size=16: another image size"):
        load_checkpoint(DiT(input_size=8, **tiny), tmp_path / "dit16.safetensors")


def test_different_values_for_tied_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"encode.weight": torch.zeros(3, 3), "decode.weight": torch.ones(3, 3)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError, match=r"different values for weights the model ties.*encode.weight = decode.weight"):
        load_checkpoint(Tied(), tmp_path / "t.safetensors")


# --------------------------------------------------------------------------------------
# Paths and damaged files
# --------------------------------------------------------------------------------------


def test_a_directory_is_called_a_directory(tmp_path):
    folder = tmp_path / "run42"
    folder.mkdir()
    torch.save(weights(Tiny()), folder / "ema.pt")
    with pytest.raises(IsADirectoryError, match=r"run42 is a directory.*ema\.pt"):
        load_checkpoint(Tiny(), folder)
    with pytest.raises(IsADirectoryError, match="run42 is a directory"):
        read_state_dict(folder)
    with pytest.raises(IsADirectoryError, match="run42 is a directory"):
        save_state_dict(Tiny(), folder)


@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_tensors_without_dense_data_are_refused_in_one_line_naming_the_file(tmp_path, kind):
    # load_state_dict's own error runs to a line per tensor, without the file.
    state = weights(Tiny(layers=3))
    state = {k: v.to("meta") if kind == "meta" else v.to_sparse() for k, v in state.items()}
    torch.save(state, tmp_path / "weights.pt")
    with pytest.raises(ValueError) as error:
        load_checkpoint(Tiny(layers=3), tmp_path / "weights.pt")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "weights.pt") in message
    assert f"layers.0.weight ({'meta' if kind == 'meta' else 'torch.sparse_coo'})" in message
    assert "tensors without dense data" in message and "… and 2 more" in message


def test_a_model_on_the_meta_device_takes_the_checkpoints_tensors(tmp_path):
    # Copying into a meta tensor keeps no data (torch only warns): the model gets the tensors,
    # in the dtypes it declares, on the CPU.
    source = Tiny(layers=2)
    source.count.fill_(7)
    save_state_dict(source.half(), tmp_path / "weights.safetensors")
    with torch.device("meta"):
        model = Tiny(layers=2)
    load_checkpoint(model, tmp_path / "weights.safetensors")
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu", name
        torch.testing.assert_close(tensor, source.state_dict()[name].to(tensor.dtype), atol=0, rtol=0)
    assert model.layers[0].weight.dtype == torch.float32 and model.count.dtype == torch.int64
    assert model.layers[0].weight.requires_grad and isinstance(model.layers[0].weight, nn.Parameter)


def test_a_meta_model_keeps_no_flat_buffer_its_checkpoints_weights_are_views_of(tmp_path):
    # guided-diffusion's fp16 training saves its weights as views of one flat float32
    # buffer: assigned as they were, the weights kept in float32 each held the whole buffer
    source = Tiny(layers=3)
    state = source.state_dict()
    flat = torch.cat([t.flatten().float() for t in state.values()])
    views, start = {}, 0
    for name, tensor in state.items():
        views[name] = flat[start : start + tensor.numel()].view(tensor.shape).to(tensor.dtype)
        start += tensor.numel()
    torch.save(views, tmp_path / "flat.pt")
    with torch.device("meta"):
        model = Tiny(layers=3)
    load_checkpoint(model, tmp_path / "flat.pt")
    for name, tensor in model.state_dict().items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
        torch.testing.assert_close(tensor, state[name], atol=0, rtol=0)


def test_a_model_on_the_meta_device_cannot_be_saved(tmp_path):
    with torch.device("meta"):
        model = Tiny()
    with pytest.raises(
        ValueError,
        match=r"cannot save .*weights.pt: the model's tensors count, layers.0.weight, "
        r".* are meta",
    ):
        save_state_dict(model, tmp_path / "weights.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_empty_file_is_called_empty(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    with pytest.raises(ValueError, match=rf"{path.name} is empty"):
        load_checkpoint(Tiny(), path)


@pytest.mark.parametrize("how", ["torch zip", "torch legacy", "safetensors header", "safetensors data"])
def test_a_truncated_file_is_named_and_called_truncated(tmp_path, how):
    whole = tmp_path / ("whole.safetensors" if how.startswith("safetensors") else "whole.pt")
    if how == "torch legacy":
        torch.save(weights(Tiny()), whole, _use_new_zipfile_serialization=False)
    else:
        write(weights(Tiny()), whole)
    data = whole.read_bytes()
    keep = {"safetensors header": 20, "safetensors data": len(data) - 8}.get(how, len(data) // 2)
    cut = tmp_path / f"cut{whole.suffix}"
    cut.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=rf"{cut.name} .*truncated") as info:
        load_checkpoint(Tiny(), cut)
    no_weights_only_false_advice(info.value)
    if how in ("torch zip", "safetensors data"):
        assert info.value.__cause__ is not None  # the loader's own error stays in the chain


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(ValueError, match=r"notes\.pt is truncated, corrupt or not a checkpoint") as info:
        read_state_dict(path)
    assert info.value.__cause__ is not None


def test_pickled_objects_are_refused_without_advising_an_unsafe_load(tmp_path):
    path = tmp_path / "train_state.pt"
    torch.save({"model": weights(Tiny()), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(
        ValueError, match=r"train_state\.pt cannot be read as tensors only .*argparse\.Namespace"
    ) as info:
        load_checkpoint(Tiny(), path)
    no_weights_only_false_advice(info.value)


def test_torch_save_files_load_only_where_weights_only_is_safe(tmp_path, monkeypatch):
    # torch 2.5 (the oldest supported) unpickles a crafted file's code even with
    # weights_only=True (CVE-2025-32434): there only safetensors files load.
    from fastguide.models import checkpoints

    pt, st = tmp_path / "tiny.pt", tmp_path / "tiny.safetensors"
    torch.save(weights(Tiny()), pt)
    checkpoints.save_state_dict(Tiny(), st)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    with pytest.raises(ValueError, match=r"tiny\.pt is a torch.save file, which torch 2\.5\.1\+cu124 cannot load"):
        read_state_dict(pt)
    assert set(read_state_dict(st)) == set(weights(Tiny()))
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    assert set(read_state_dict(pt)) == set(weights(Tiny()))


def test_a_state_dict_names_what_is_wrong_with_it(tmp_path):
    # a non-tensor entry after the tensors was never named (the first five were listed), and
    # a key that is no string raised a TypeError from the message's join
    path = tmp_path / "stepped.pt"
    torch.save({**weights(Tiny()), "step": 5}, path)
    with pytest.raises(
        ValueError, match=r"stepped\.pt does not hold a state dict of tensors: it holds a dict of 'step'"
    ):
        read_state_dict(path)
    torch.save({0: torch.zeros(2), "bias": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"its keys must be names, got \[0\]"):
        read_state_dict(path)


def test_a_dict_of_more_than_tensors_is_described(tmp_path):
    path = tmp_path / "nested.pt"
    torch.save({"model": weights(Tiny()), "step": 10}, path)
    with pytest.raises(ValueError, match=r"nested\.pt does not hold a state dict of tensors: .*'model' \(dict\)"):
        read_state_dict(path)
    # a training checkpoint of state dicts (DiT's {"model", "ema", "opt"}): the one to save
    torch.save({"model": weights(Tiny()), "ema": weights(Tiny())}, path)
    with pytest.raises(ValueError, match=r"torch.save\(torch.load\(path\)\['ema'\], new_path\)"):
        read_state_dict(path)


# --------------------------------------------------------------------------------------
# The format comes from the content
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["weights.pt", "weights.bin", "weights"])
def test_a_safetensors_file_loads_whatever_its_suffix(tmp_path, name):
    source = Tiny()
    path = tmp_path / name
    save_file(weights(source), str(path))
    with pytest.raises(Exception) as refused:  # what torch.load alone makes of it
        torch.load(path, weights_only=True)
    assert "weights_only" in str(refused.value)
    model = load_checkpoint(Tiny(), path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_torch_file_named_safetensors_loads(tmp_path):
    source = Tiny()
    path = tmp_path / "mislabelled.safetensors"
    torch.save(weights(source), path)
    model = load_checkpoint(Tiny(), path)
    torch.testing.assert_close(model.layers[0].weight, source.layers[0].weight, rtol=0, atol=0)
