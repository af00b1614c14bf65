import torch
import torch.nn.functional as F

from lorabooth.objective import diffusion_target, dreambooth_loss, with_prior_target


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
