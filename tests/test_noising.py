"""The forward processes the families train on (training/noising.py)."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from lorabooth.training.noising import DDPMNoising, FlowNoising, noising_for, resolution_mu


def _x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)


def test_each_scheduler_gets_its_process():
    assert isinstance(noising_for(DDPMScheduler()), DDPMNoising)
    assert isinstance(noising_for(FlowMatchEulerDiscreteScheduler()), FlowNoising)


def test_ddpm_process_is_the_schedulers():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    process = noising_for(scheduler)
    x, noise = _x()
    t = process.draw(3, torch.Generator().manual_seed(1))
    assert torch.equal(t, torch.randint(0, 1000, (3,), generator=torch.Generator().manual_seed(1)))
    assert torch.equal(process.noisy(x, noise, t), scheduler.add_noise(x, noise, t))
    assert torch.allclose(process.target(x, noise, t), scheduler.get_velocity(x, noise, t), atol=1e-6)
    assert process.weights(t, 0.0) is None and process.weights(t, 5.0).shape == (3,)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_process_interpolates_and_targets_the_velocity(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    process = FlowNoising(scheduler, "uniform")
    # the training schedule is the scheduler's own at init (diffusers' trainers read it)
    assert torch.allclose(process.sigmas, FlowMatchEulerDiscreteScheduler(shift=shift).sigmas[:1000])
    scheduler.set_timesteps(4)  # a pipeline drew with it since: the training schedule is unmoved
    assert torch.allclose(FlowNoising(scheduler, "uniform").sigmas, process.sigmas)
    x, noise = _x()
    t = process.draw(3, torch.Generator().manual_seed(2))
    assert torch.all(t > 0) and torch.all(t <= 1000) and all(v in process.timesteps for v in t)
    s = (t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(process.noisy(x, noise, t), (1 - s) * x + s * noise)
    assert torch.equal(process.target(x, noise, t), noise - x)
    assert process.weights(t, 0.0) is None  # the densities shape the draw, not the loss


def test_flow_draws_follow_the_density_and_the_generator():
    process = FlowNoising(FlowMatchEulerDiscreteScheduler(), "logit_normal")
    a = process.draw(4000, torch.Generator().manual_seed(3))
    assert torch.equal(a, process.draw(4000, torch.Generator().manual_seed(3)))
    # logit-normal(0, 1) puts its mass in the middle: sigma's mean 0.5, few beyond 0.9
    s = a / 1000
    assert abs(s.mean().item() - 0.5) < 0.02 and (s > 0.9).float().mean() < 0.1
    uniform = FlowNoising(FlowMatchEulerDiscreteScheduler(), "uniform").draw(
        4000, torch.Generator().manual_seed(3)) / 1000
    assert (uniform > 0.9).float().mean() > 0.08


def test_resolution_shift_is_the_one_drawing_uses():
    """With dynamic shifting the training sigmas are shifted by the image's
    token count exactly as the pipeline shifts its sampling sigmas."""
    config = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                  base_image_seq_len=256, max_image_seq_len=4096)
    plain = FlowNoising(FlowMatchEulerDiscreteScheduler(**config), "uniform")
    big = FlowNoising(FlowMatchEulerDiscreteScheduler(**config), "uniform", image_seq_len=4096)
    assert torch.allclose(plain.sigmas, torch.linspace(1, 0.001, 1000), atol=1e-5)
    assert resolution_mu(FlowMatchEulerDiscreteScheduler(**config).config, 4096) == pytest.approx(1.15)
    drawing = FlowMatchEulerDiscreteScheduler(**config)
    drawing.set_timesteps(sigmas=plain.sigmas.numpy(), mu=1.15)
    assert torch.allclose(big.sigmas, drawing.sigmas[:1000], atol=1e-6)
    assert torch.all(big.sigmas >= plain.sigmas - 1e-7)  # noisier at large sizes
