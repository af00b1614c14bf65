import pytest
import torch
import torch.nn.functional as F

from lorabooth.training.objective import (
    diffusion_target,
    dreambooth_loss,
    min_snr_weights,
    offset_noise,
    with_prior_target,
)


def test_epsilon_target_is_the_noise():
    noise, latents = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 900])
    assert torch.equal(diffusion_target(noise, latents, t, torch.rand(1000), "epsilon"), noise)


def test_v_target_matches_its_definition():
    noise, latents = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ac = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([0, 500])
    v = diffusion_target(noise, latents, t, ac, "v_prediction")
    for i, ti in enumerate(t):
        a = ac[ti]
        expected = a.sqrt() * noise[i] - (1 - a).sqrt() * latents[i]
        assert torch.allclose(v[i], expected, atol=1e-6)


def test_loss_without_prior_is_plain_mse():
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    total, inst, prior = dreambooth_loss(pred, target, num_instance=2, prior_weight=1.0)
    assert prior is None
    assert torch.allclose(total, F.mse_loss(pred, target)) and torch.equal(total, inst)


def test_loss_with_prior_weights_the_class_half():
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    total, inst, prior = dreambooth_loss(pred, target, num_instance=2, prior_weight=0.3)
    assert torch.allclose(inst, F.mse_loss(pred[:2], target[:2]))
    assert torch.allclose(prior, F.mse_loss(pred[2:], target[2:]))
    assert torch.allclose(total, inst + 0.3 * prior)
    # the class half really is the second half: perturbing it moves only prior
    pred2 = pred.clone()
    pred2[2:] += 1
    _, inst2, prior2 = dreambooth_loss(pred2, target, 2, 0.3)
    assert torch.equal(inst2, inst) and not torch.allclose(prior2, prior)


def test_model_prior_target_is_the_frozen_prediction_on_the_class_rows():
    """--prior-preservation model: instance rows keep the diffusion target, the
    class rows' target is the frozen model's prediction, and the prior term is
    the MSE to it, weighted; no gradient reaches the frozen prediction."""
    pred = torch.randn(4, 4, 8, 8, requires_grad=True)
    target, frozen = torch.randn(4, 4, 8, 8), torch.randn(2, 4, 8, 8, requires_grad=True)
    full = with_prior_target(target, 2, frozen)
    assert full.shape == (4, 4, 8, 8)
    assert torch.equal(full[:2], target[:2]) and torch.equal(full[2:], frozen.detach())
    total, inst, prior = dreambooth_loss(pred, full, num_instance=2, prior_weight=0.3)
    assert torch.allclose(inst, F.mse_loss(pred[:2], target[:2]))
    assert torch.allclose(prior, F.mse_loss(pred[2:], frozen))
    assert torch.allclose(total, inst + 0.3 * prior)
    total.backward()
    assert frozen.grad is None and pred.grad[2:].abs().sum() > 0
    # a LoRA that predicts what the frozen model predicts pays no prior
    _, _, none = dreambooth_loss(torch.cat([pred[:2], frozen]), full, 2, 0.3)
    assert none.item() == 0.0


def test_model_prior_target_keeps_the_batch_dtype():
    target = torch.randn(2, 4, 2, 2)
    full = with_prior_target(target, 1, torch.randn(1, 4, 2, 2, dtype=torch.bfloat16))
    assert full.dtype == torch.float32


def _alphas_for_snr(snrs):
    """alphas_cumprod whose timestep i has SNR snrs[i]: a = SNR / (1 + SNR)."""
    snr = torch.tensor(snrs, dtype=torch.float64)
    return snr / (1 + snr)


def test_min_snr_weights_for_known_snrs():
    ac = _alphas_for_snr([100.0, 5.0, 1.0, 0.25])
    t = torch.tensor([0, 1, 2, 3, 0])
    eps = min_snr_weights(t, ac, 5.0, "epsilon")
    # min(SNR, 5) / SNR: 5/100 where the SNR is above gamma, 1 at or below it
    assert eps.tolist() == pytest.approx([0.05, 1.0, 1.0, 1.0, 0.05])
    v = min_snr_weights(t, ac, 5.0, "v_prediction")
    # min(SNR, 5) / (SNR + 1)
    assert v.tolist() == pytest.approx([5 / 101, 5 / 6, 1 / 2, 0.25 / 1.25, 5 / 101])
    assert eps.shape == (5,) and eps.dtype == torch.float32
    assert min_snr_weights(torch.tensor([0]), torch.tensor([0.0]), 5.0, "epsilon").item() == 1.0
    with pytest.raises(ValueError):
        min_snr_weights(t, ac, 5.0, "sample")


def test_min_snr_weights_on_the_sd_schedule_fall_only_at_low_noise():
    from lorabooth.models.loading import build_tiny

    ac = build_tiny().noise_scheduler.alphas_cumprod
    w = min_snr_weights(torch.arange(1000), ac, 5.0, "epsilon")
    snr = ac / (1 - ac)
    assert torch.all(w[snr <= 5] == 1) and torch.all(w[snr > 5] < 1)
    assert w[0] < 0.01 and torch.all(w[1:] >= w[:-1])  # rising with the noise level


def test_weighted_loss_without_weights_is_the_old_loss():
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    for n in (2, 4):
        old = dreambooth_loss(pred, target, n, 0.3)
        assert dreambooth_loss(pred, target, n, 0.3, None) == old
        ones = dreambooth_loss(pred, target, n, 0.3, torch.ones(4))  # every row weighs 1
        assert all((a is None and b is None) or torch.allclose(a, b)
                   for a, b in zip(ones, old))


def test_weighted_loss_weighs_each_row_in_both_parts():
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    w = torch.tensor([0.5, 2.0, 0.1, 3.0])
    total, inst, prior = dreambooth_loss(pred, target, 2, 0.3, w)
    rows = [F.mse_loss(pred[i], target[i]) for i in range(4)]
    assert torch.allclose(inst, (0.5 * rows[0] + 2.0 * rows[1]) / 2)
    assert torch.allclose(prior, (0.1 * rows[2] + 3.0 * rows[3]) / 2)
    assert torch.allclose(total, inst + 0.3 * prior)
    # batch size 1: the weight still scales the loss (no normalising by the weights' sum)
    one, _, none = dreambooth_loss(pred[:1], target[:1], 1, 1.0, torch.tensor([0.25]))
    assert none is None and torch.allclose(one, 0.25 * rows[0])


def test_noise_offset_is_one_seeded_shift_per_sample_and_channel():
    noise = torch.randn(3, 4, 8, 8)
    out = offset_noise(noise, 0.1, torch.Generator().manual_seed(7))
    shift = (out - noise) / 0.1
    # constant over each (sample, channel) plane: the (B, C, 1, 1) structure
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-5)
    assert torch.allclose(shift[:, :, 0, 0], torch.randn(3, 4, generator=torch.Generator().manual_seed(7)),
                          atol=1e-5)
    again = offset_noise(noise, 0.1, torch.Generator().manual_seed(7))
    assert torch.equal(out, again)
    assert not torch.equal(out, offset_noise(noise, 0.1, torch.Generator().manual_seed(8)))


def test_zero_noise_offset_is_the_noise_and_draws_nothing():
    noise, rng = torch.randn(2, 4, 8, 8), torch.Generator().manual_seed(3)
    state = rng.get_state()
    assert offset_noise(noise, 0.0, rng) is noise
    assert torch.equal(rng.get_state(), state)
