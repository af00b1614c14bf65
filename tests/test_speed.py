"""The fast training step computes what the plain one does.

The plain step is what diffusers' script does every step: encode the photo
with the VAE, run the text encoder, noise, predict, MSE, one AdamW (for-loop)
update. Ours reads cached VAE posteriors and prompt embeddings, runs under
the tuned allocator and uses foreach AdamW. Same noise, same timesteps: the
loss, the LoRA gradients and the updated LoRA weights must agree to fp32
rounding.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import lorabooth.training.loop as t
from helpers import PINNED_FIRST_LOSSES
from lorabooth import TrainConfig, train
from lorabooth.adapters.lora import add_unet_lora, freeze_all_but_lora, lora_parameters
from lorabooth.models.families import tokenize
from lorabooth.models.loading import build_tiny
from lorabooth.models.precision import cast_frozen, frozen_dtype, tune_allocator
from lorabooth.training.data import load_image
from lorabooth.training.noising import Denoiser, noising_for
from lorabooth.training.setup import setup_optimizer

RES = 64


def _plain_loss(base, unet, paths, prompts, weight, gen, timesteps):
    """The reference's way: encode every step (the posterior sample draws
    from ``gen``), run the text encoder, then the same noise and loss."""
    pixels = torch.stack([load_image(p, RES) for p in paths])
    latents = base.vae.encode(pixels).latent_dist.sample(generator=gen)
    latents = latents * base.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen)
    context = base.text_encoder(tokenize(base.tokenizer, prompts))[0]
    noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, context).sample
    n = len(paths) // 2
    return F.mse_loss(pred[:n], noise[:n]) + weight * F.mse_loss(pred[n:], noise[n:])


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_fast_step_equals_the_plain_step(photos, tmp_path, weight):
    assert tune_allocator()  # this machine is Linux + glibc; the setting must take
    base = build_tiny()
    for m in (base.unet, base.vae, base.text_encoder):
        m.requires_grad_(False)
    torch.manual_seed(0)
    add_unet_lora(base.unet, 4, 4)
    freeze_all_but_lora(base.unet)
    with torch.no_grad():  # B starts at zero: move it so the gradients reach A too
        for p in lora_parameters(base.unet):
            p.add_(torch.randn_like(p) * 0.05)
    plain_unet = copy.deepcopy(base.unet)

    paths = sorted(photos.iterdir())[:2]  # one instance photo, one stand-in class image
    config = TrainConfig(model="tiny", instance_dir=str(photos), output=str(tmp_path / "o"),
                         instance_prompt="a photo of sks dog", class_prompt="a photo of a dog",
                         prior_preservation=True, prior_loss_weight=weight)
    examples = t.setup_examples(config, base, RES, paths[:1],
                                 t.instance_captions(config, paths[:1]), paths[1:])
    timesteps = torch.tensor([700, 120])

    gen = torch.Generator().manual_seed(3)
    latents = t.sample_latents(examples, [0], [0], gen)
    noise = torch.randn(latents.shape, generator=gen)
    context = t.text_context(examples, {"unet": base.unet}, [0], 1, torch.device("cpu"))
    denoiser = Denoiser(base.unet, base.family, noising_for(base.noise_scheduler))
    fast, _, _ = t.step_loss(denoiser, latents, noise, timesteps, context, 1, weight)
    plain = _plain_loss(base, plain_unet, paths, ["a photo of sks dog", "a photo of a dog"],
                        weight, torch.Generator().manual_seed(3), timesteps)
    assert fast.item() == pytest.approx(plain.item(), rel=1e-5)

    fast.backward(), plain.backward()
    ours, theirs = lora_parameters(base.unet), lora_parameters(plain_unet)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    assert any(a.grad.abs().sum() > 0 for a in ours)

    for a, b in zip(ours, theirs):  # the same gradients: now compare the optimisers alone
        b.grad = a.grad.clone()
    optimizer, _ = setup_optimizer(config, {"unet": base.unet})  # foreach AdamW
    optimizer.step()
    torch.optim.AdamW(theirs, lr=config.lr, weight_decay=1e-2, foreach=False).step()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_cast_frozen_keeps_lora_fp32():
    unet = build_tiny().unet
    add_unet_lora(unet, 4, 4)
    cast_frozen(unet, torch.bfloat16)
    dtypes = {("lora_" in n, p.dtype) for n, p in unet.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert frozen_dtype(unet) == torch.bfloat16
    cast_frozen(unet, torch.float32)
    assert frozen_dtype(unet) == torch.float32


def test_bf16_run_keeps_frozen_weights_bf16_and_close_to_fp32(photos, tmp_path, on_finish):
    """--mixed-precision bf16 stores the frozen UNet in bf16 (no per-step cast),
    trains fp32 LoRA weights, and its losses follow the fp32 run's."""
    seen = {}

    def look(config, base, modules):
        seen["frozen"] = frozen_dtype(modules["unet"])
        seen["text_encoder"] = base.text_encoder

    on_finish(look)
    runs = {}
    for precision in ("no", "bf16"):
        runs[precision] = train(TrainConfig(
            model="tiny", instance_dir=str(photos), instance_prompt="a photo of sks dog",
            steps=3, seed=0, mixed_precision=precision, output=str(tmp_path / precision)))
        seen[precision] = seen.pop("frozen")
    assert seen["no"] == torch.float32 and seen["bf16"] == torch.bfloat16
    assert seen["text_encoder"] is None  # embeddings cached, nothing else needed it: freed
    losses = {k: [json.loads(line)["loss"] for line in (v / "metrics.jsonl").read_text().splitlines()]
              for k, v in runs.items()}
    assert losses["bf16"] == pytest.approx(losses["no"], rel=3e-2)


def test_gradient_checkpointing_trains_the_same(photos, tmp_path, on_finish):
    """Recomputing activations saves memory and changes nothing else: the
    seeded losses are test_train's pinned ones."""
    seen = {}
    on_finish(lambda config, base, modules: seen.update(
        {config.output: {name: m.is_gradient_checkpointing for name, m in modules.items()}}))
    run = train(TrainConfig(model="tiny", instance_dir=str(photos), steps=3, seed=0,
                            instance_prompt="a photo of sks dog", output=str(tmp_path / "gc"),
                            gradient_checkpointing=True))
    run_te = train(TrainConfig(model="tiny", instance_dir=str(photos), steps=1, seed=0,
                               instance_prompt="a photo of sks dog", train_text_encoder=True,
                               output=str(tmp_path / "gc-te"), gradient_checkpointing=True))
    assert seen == {str(run): {"unet": True},
                    str(run_te): {"unet": True, "text_encoder": True}}
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(PINNED_FIRST_LOSSES, abs=1e-4)


def test_folder_unet_loads_straight_into_the_training_dtype():
    """Under bf16 the UNet is converted while loading (no fp32 copy in memory);
    the VAE and text encoder, which cache latents and embeddings, stay fp32."""
    from lorabooth.models.loading import load_base

    base = load_base("toy", unet_dtype=torch.bfloat16)
    assert frozen_dtype(base.unet) == torch.bfloat16
    assert frozen_dtype(base.vae) == frozen_dtype(base.text_encoder) == torch.float32
    assert frozen_dtype(load_base("toy").unet) == torch.float32
