"""Block swap (issue 28 §2): the schedule of loads and parks, the result
equal to no offload (loss and every LoRA gradient, with and without gradient
checkpointing), a parked block that cannot run, and train's option."""

from __future__ import annotations

import copy

import pytest
import torch

from lorabooth.adapters.lora import (
    UNET_TARGETS,
    add_unet_lora,
    freeze_all_but_lora,
    lora_parameters,
)
from lorabooth.formats import flux
from lorabooth.models.families import FAMILIES, Conditioning
from lorabooth.models.loading import load_base
from lorabooth.models.offload import BlockSwap, denoiser_blocks

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny_unet():
    base = load_base("tiny")
    unet = base.unet.float().requires_grad_(False)
    add_unet_lora(unet, 4, 4.0, False, UNET_TARGETS)
    freeze_all_but_lora(unet)
    for p in lora_parameters(unet):  # lora_B starts at zero: give every LoRA a gradient path
        torch.nn.init.normal_(p, std=0.02)
    return unet, base.text_encoder.config.hidden_size


def _loss_and_grads(unet, width, checkpointing=False):
    torch.manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 8, 8)
    context = torch.randn(2, 7, width)
    t = torch.tensor([10, 500])
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    unet.zero_grad(set_to_none=True)
    out = FAMILIES["sd1"].predict(unet, latents, t, Conditioning(context))
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(unet)]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("swapped", [1, 3, 5])
def test_swap_gives_the_same_loss_and_gradients(tiny_unet, swapped, checkpointing):
    unet, width = tiny_unet
    plain = copy.deepcopy(unet)
    want_loss, want_grads = _loss_and_grads(plain, width, checkpointing)
    swapped_unet = copy.deepcopy(unet)
    swap = BlockSwap(denoiser_blocks(swapped_unet), swapped, "cpu", root=swapped_unet)
    for _ in range(2):  # the denoiser's next forward settles what a backward left
        loss, grads = _loss_and_grads(swapped_unet, width, checkpointing)
        assert torch.equal(loss, want_loss)
        # up to float summation order: the identity nodes the schedule puts on
        # a block's inputs change the order autograd adds a skip connection's
        # gradients (the loss, a forward, is bit-equal)
        for got, want in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    swap.settle()
    assert not swap.loaded  # everything parked between steps


def test_schedule_loads_ahead_and_parks_behind(tiny_unet):
    unet, width = tiny_unet
    unet = copy.deepcopy(unet)
    blocks = denoiser_blocks(unet)
    assert len(blocks) == 5  # tiny: 2 down, 1 mid, 2 up blocks
    swap = BlockSwap(blocks, 3, "cpu", record=True)  # blocks 2, 3, 4 swap
    _loss_and_grads(unet, width)
    swap.settle()
    assert swap.events == [
        # forward: each swapped block loaded before it runs, the next one prefetched
        ("load", 2), ("load", 3), ("park", 2), ("load", 4), ("park", 3), ("park", 4),
        # backward in reverse: loaded when its output's gradient arrives, the
        # one before prefetched, parked once the gradient reaches its inputs
        ("load", 4), ("load", 3), ("park", 4), ("load", 2), ("park", 3), ("park", 2)]
    loaded, peak = set(), 0
    for what, i in swap.events:
        (loaded.add if what == "load" else loaded.discard)(i)
        peak = max(peak, len(loaded))
    assert peak == 2  # the block in use and the one prefetched


def test_no_grad_forward_parks_everything(tiny_unet):
    unet, width = tiny_unet
    unet = copy.deepcopy(unet)
    want = None
    with torch.no_grad():
        latents, context = torch.randn(1, unet.config.in_channels, 8, 8), torch.randn(1, 7, width)
        want = FAMILIES["sd1"].predict(unet, latents, torch.tensor([3]), Conditioning(context))
        swap = BlockSwap(denoiser_blocks(unet), 2, "cpu")
        got = FAMILIES["sd1"].predict(unet, latents, torch.tensor([3]), Conditioning(context))
    assert torch.equal(got, want)
    assert not swap.loaded


def test_a_parked_block_cannot_run(tiny_unet):
    unet, _ = tiny_unet
    unet = copy.deepcopy(unet)
    blocks = denoiser_blocks(unet)
    swap = BlockSwap(blocks, 1, "cpu")
    swap.handles[0].remove()  # the pre-hook that loads it: gone
    frozen = [p for p in blocks[-1].parameters() if not p.requires_grad]
    assert frozen and all(p.numel() == 0 for p in frozen)
    assert all(p.numel() > 0 for p in lora_parameters(blocks[-1]))  # LoRA stays resident
    assert swap.frozen_host_bytes() == sum(
        t.numel() * t.element_size() for _, t in swap.host[len(blocks) - 1])
    swap.remove()
    assert all(p.numel() > 0 for p in frozen)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flux_transformer_swaps_alike(checkpointing):
    """FLUX checkpoints whole blocks: the recomputation runs a block's
    forward (its hooks too) inside its backward."""
    base = load_base("tiny-flux2")
    net = base.unet.float().requires_grad_(False)
    blocks = denoiser_blocks(net)
    assert blocks == [*net.transformer_blocks, *net.single_transformer_blocks]
    add_unet_lora(net, 4, 4.0, False, flux.target_modules("flux2"))
    freeze_all_but_lora(net)
    for p in lora_parameters(net):
        torch.nn.init.normal_(p, std=0.02)
    if checkpointing:
        net.enable_gradient_checkpointing()
    net.train()

    def step(model):
        torch.manual_seed(0)
        latents = torch.randn(1, net.config.in_channels, 4, 4)  # flux2: already patchified
        hidden = torch.randn(1, 6, net.config.joint_attention_dim)
        model.zero_grad(set_to_none=True)
        out = FAMILIES["flux2"].predict(model, latents, torch.tensor([0.5]), Conditioning(hidden))
        out.pow(2).mean().backward()
        return [p.grad.clone() for p in lora_parameters(model)]

    want = step(copy.deepcopy(net))
    swapped = copy.deepcopy(net)
    swap = BlockSwap(denoiser_blocks(swapped), len(blocks) - 1, "cpu", root=swapped)
    for got, expected in zip(step(swapped), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)
    swap.settle()
    assert not swap.loaded


def test_swap_refuses_a_count_out_of_range(tiny_unet):
    unet, _ = tiny_unet
    with pytest.raises(ValueError):
        BlockSwap(denoiser_blocks(copy.deepcopy(unet)), 6, "cpu")


@pytest.mark.parametrize("model", ["tiny", "tiny-flux2"])
def test_train_with_swapped_blocks_saves_the_same_lora(tmp_path, session_photos, model, caplog):
    """train --blocks-to-swap: the same losses and LoRA file as without
    (up to the float summation order above), validation drawing included."""
    from safetensors.torch import load_file

    from lorabooth import TrainConfig, train
    from lorabooth.formats import WEIGHT_NAME

    def run(name, **kw):
        config = TrainConfig(
            model=model, instance_dir=str(session_photos), instance_prompt="a photo of sks dog",
            class_prompt="a photo of a dog", prior_preservation="model",
            steps=3, lr=1e-2, rank=4, seed=0,
            gradient_checkpointing=True, output=str(tmp_path / name),
            validation_prompt="a photo of sks dog", **kw)
        return load_file(train(config) / WEIGHT_NAME)

    plain = run("plain")
    with caplog.at_level("INFO", logger="lorabooth"):
        swapped = run("swapped", blocks_to_swap=2)
    assert "--blocks-to-swap 2:" in caplog.text and "MB of frozen weights in CPU memory" in caplog.text
    assert plain.keys() == swapped.keys()
    for key in plain:
        torch.testing.assert_close(swapped[key], plain[key], rtol=1e-4, atol=1e-7)


def test_train_refuses_more_blocks_than_the_model_has(tmp_path, session_photos):
    from lorabooth import TrainConfig, train
    from lorabooth.core.errors import UserError

    with pytest.raises(UserError, match="--blocks-to-swap 9: the model's denoiser has 5 blocks"):
        train(TrainConfig(model="tiny", instance_dir=str(session_photos), steps=1,
                          instance_prompt="a photo of sks dog", output=str(tmp_path / "r"),
                          blocks_to_swap=9))
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_swap_under_a_quantised_base(precision):
    """--blocks-to-swap with --base-precision: torchao's and bitsandbytes'
    weights park and load as plain ones do (on the CPU; the CUDA copy of
    bitsandbytes' quantisation state is for the GPU script to show)."""
    from lorabooth.models.quantise import quantise_module

    base = load_base("tiny")
    unet = base.unet.float().requires_grad_(False)
    assert quantise_module(unet, precision) > 0
    add_unet_lora(unet, 4, 4.0, False, UNET_TARGETS)
    freeze_all_but_lora(unet)
    for p in lora_parameters(unet):
        torch.nn.init.normal_(p, std=0.02)
    width = base.text_encoder.config.hidden_size
    _, want = _loss_and_grads(copy.deepcopy(unet), width)
    swapped = copy.deepcopy(unet)
    swap = BlockSwap(denoiser_blocks(swapped), 3, "cpu", root=swapped)
    _, got = _loss_and_grads(swapped, width)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-9)
    swap.settle()
    assert not swap.loaded
