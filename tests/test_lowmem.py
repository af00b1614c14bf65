"""The streamed loader gives what diffusers' from_pretrained gives, bit for
bit, while holding no more than one full-precision tensor at a time."""

import json
import platform
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

import lorabooth.models.lowmem as lowmem
from lorabooth import TrainConfig, train
from lorabooth.core.errors import UserError
from lorabooth.models.loading import build_tiny, load_base, save_base
from lorabooth.models.lowmem import load_unet


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory) -> Path:
    return save_base(build_tiny(), tmp_path_factory.mktemp("fp32") / "m")


def _assert_same(streamed, reference) -> None:
    want, got = reference.state_dict(), streamed.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key
    assert dict(streamed.config) == dict(reference.config)
    assert streamed.training == reference.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_streamed_unet_is_bit_identical_to_from_pretrained(fp32_folder, dtype):
    reference = UNet2DConditionModel.from_pretrained(fp32_folder, subfolder="unet", torch_dtype=dtype)
    _assert_same(load_unet(fp32_folder / "unet", dtype, fp32_folder), reference)


def test_sharded_unet_streams_every_shard(tmp_path):
    """Large UNets (SDXL's, 10 GB in fp32) are saved in shards with an index."""
    unet = build_tiny().unet
    unet.save_pretrained(tmp_path / "unet", max_shard_size="200KB")
    assert len(list((tmp_path / "unet").glob("*.safetensors"))) > 1
    assert lowmem.weight_files(tmp_path / "unet") is not None
    reference = UNet2DConditionModel.from_pretrained(tmp_path / "unet", torch_dtype=torch.bfloat16)
    streamed = load_unet(tmp_path / "unet", torch.bfloat16, tmp_path / "unet")
    _assert_same(streamed, reference)


def test_weights_in_pickle_files_fall_back_to_diffusers(tmp_path):
    build_tiny().unet.save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert lowmem.weight_files(tmp_path / "unet") is None
    unet = load_unet(tmp_path / "unet", torch.bfloat16, tmp_path)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_loader_holds_one_full_precision_tensor_at_a_time(fp32_folder, monkeypatch):
    """Every tensor read is gone before the next is read, and the file is
    never memory-mapped (mapped pages stay resident until the mapping closes)."""
    real_open = lowmem.safe_open
    file = fp32_folder / "unet" / lowmem.WEIGHTS
    read: list[weakref.ref] = []

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.opened = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def offset_keys(self):
            return self.opened.offset_keys()

        def get_tensor(self, key):
            alive = [r for r in read if r() is not None]
            assert not alive, f"{len(alive)} tensors read earlier still alive when reading {key}"
            if platform.system() == "Linux":
                assert not _mapped(file)
            tensor = self.opened.get_tensor(key)
            assert tensor.dtype == torch.float32
            read.append(weakref.ref(tensor))
            return tensor

    monkeypatch.setattr(lowmem, "safe_open", Spy)
    unet = load_unet(fp32_folder / "unet", torch.bfloat16, fp32_folder)
    assert len(read) == len(unet.state_dict()) > 100
    assert all(r() is None for r in read)


def test_bf16_training_loses_exactly_what_the_old_loader_gave(fp32_folder, photos, tmp_path,
                                                              monkeypatch):
    def losses(out: Path) -> list[float]:
        run = train(TrainConfig(model=str(fp32_folder), instance_dir=str(photos), steps=2, seed=0,
                                instance_prompt="a photo of sks dog", mixed_precision="bf16",
                                output=str(out)))
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    streamed = losses(tmp_path / "streamed")
    monkeypatch.setattr(lowmem, "load_streamed", lambda *args: None)  # diffusers' own path
    assert streamed == losses(tmp_path / "diffusers")


def test_a_unet_file_missing_weights_names_the_folder(fp32_folder, tmp_path):
    broken = save_base(build_tiny(), tmp_path / "m")
    file = broken / "unet" / lowmem.WEIGHTS
    tensors = load_file(file)
    tensors.pop("conv_in.weight")
    save_file(tensors, file)
    with pytest.raises(UserError, match=r"lacks 1 of the model's weights \(e.g. conv_in.weight\)"):
        load_base(str(broken), unet_dtype=torch.bfloat16)


def test_a_truncated_unet_file_is_one_clear_error(tmp_path):
    broken = save_base(build_tiny(), tmp_path / "m")
    file = broken / "unet" / lowmem.WEIGHTS
    file.write_bytes(file.read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot read .*diffusion_pytorch_model.safetensors"):
        load_base(str(broken), unet_dtype=torch.bfloat16)
