import os
import socket
from pathlib import Path

import pytest

from helpers import make_photos, make_sdxl_lora
from hostile import finished_run as build_finished_run
from hostile import smooth_photos

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test processes on the machine's cores (make test: 2): one torch
    # thread each, here and in every process a test starts, or their OpenMP
    # threads outnumber the cores and wait on each other (three 2-thread
    # torch processes on 2 cores made a toy step 12 s instead of under 1 s).
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# Installed in a subprocess (as sitecustomize, imported at start-up) to refuse
# every connection the way `no_network` does in this process; each attempt is
# appended to the log file, which exists from start-up so that an empty log
# proves the blocker ran and nothing tried the network.
NETWORK_BLOCKER = """
import os, socket
_log = os.environ["LORABOOTH_TEST_NETWORK_LOG"]
open(_log, "a").close()

def _refuse(*args, **kwargs):
    with open(_log, "a") as f:
        f.write(repr(args) + "\\n")
    raise OSError("network blocked by the test")

socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = socket.getaddrinfo = _refuse
"""


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every connection (and name lookup) in this process fails with OSError,
    as on a machine without a network; returns the list of attempts."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"),
                        (socket, "create_connection"), (socket, "getaddrinfo")):
        monkeypatch.setattr(owner, name, refuse)
    return attempts


@pytest.fixture
def no_network_env(tmp_path) -> tuple[dict, Path]:
    """An environment for a subprocess in which the network is blocked as by
    `no_network`, and the file its attempts are written to."""
    folder = tmp_path / "no_network"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(NETWORK_BLOCKER)
    path = [str(folder)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    log = folder / "attempts.txt"
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path),
            "LORABOOTH_TEST_NETWORK_LOG": str(log)}, log






@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return make_photos(tmp_path / "photos")


@pytest.fixture
def prompts(tmp_path) -> str:
    """A `tune --prompts` file of one template."""
    f = tmp_path / "prompts.txt"
    f.write_text("a {0} {1} on the beach\n")
    return str(f)


@pytest.fixture(scope="session")
def session_photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("subject") / "photos")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, session_photos) -> Path:
    """One small run with everything on: prior preservation, text-encoder LoRA,
    alpha != rank (so a loader that ignored alpha would be caught)."""
    from lorabooth import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "full"
    config = TrainConfig(
        model="tiny", instance_dir=str(session_photos), instance_prompt="a photo of sks dog",
        class_prompt="a photo of a dog", prior_preservation=True, num_class_images=2,
        class_draw_steps=2, steps=4, lr=1e-2, lr_text=1e-2, train_text_encoder=True,
        rank=4, alpha=8, seed=0, output=str(out), validation_prompt="a photo of sks dog",
    )
    return train(config)


@pytest.fixture(scope="session")
def sdxl_lora(tmp_path_factory) -> Path:
    """A trained-looking LoRA of the tiny SDXL model (UNet and both text
    encoders, rank 4, alpha 8) as diffusers' own SDXL saver writes it."""
    return make_sdxl_lora(tmp_path_factory.mktemp("sdxl_lora"), rank=4, alpha=8.0)


@pytest.fixture(scope="session")
def tiny_judges(tmp_path_factory) -> tuple[str, str]:
    """Random-weight DINO-shaped (ViT) and CLIP models saved as local folders,
    standing in for facebook/dino-vits16 and openai/clip-vit-base-patch32."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        ViTConfig,
        ViTModel,
    )
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from lorabooth.models.loading import clip_tokenizer

    root = tmp_path_factory.mktemp("judges")
    torch.manual_seed(0)
    dino = root / "dino"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, image_size=32, patch_size=8),
             add_pooling_layer=False).save_pretrained(dino)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(dino)
    clip = root / "clip"
    CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16)).save_pretrained(clip)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                          ).save_pretrained(clip)
    clip_tokenizer().save_pretrained(clip)
    return str(dino), str(clip)


@pytest.fixture
def on_finish(monkeypatch):
    """Look inside a training run just before it saves its LoRA:
    ``on_finish(look)`` makes every following run call ``look(config, base,
    modules)`` and then its real ``_finish``."""
    import lorabooth.training.loop as t

    real = t._finish

    def install(look) -> None:
        def spy(config, base, output, modules, resolution, *whole):
            look(config, base, modules)
            real(config, base, output, modules, resolution, *whole)
        monkeypatch.setattr(t, "_finish", spy)
    return install



@pytest.fixture(scope="module")
def module_photos(tmp_path_factory) -> Path:
    """The hostile tables' photo folder, made once a module (rows copy it)."""
    return smooth_photos(tmp_path_factory.mktemp("subject") / "photos", 3)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, module_photos) -> Path:
    """The finished run every hostile row must leave alone (a step-1 checkpoint too)."""
    return build_finished_run(module_photos, tmp_path_factory.mktemp("finished") / "run")
