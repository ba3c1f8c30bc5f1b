import math

import pytest
import torch

from tirsynth import losses
from tirsynth.config import LossConfig


def test_adversarial_loss_hand_values():
    zero = torch.zeros(1, 1, 2, 2)
    assert losses.adversarial_loss(zero, True).item() == pytest.approx(math.log(2))
    assert losses.adversarial_loss(zero, False, "lsgan").item() == 0.0
    assert losses.adversarial_loss(zero + 1, False, "lsgan").item() == 1.0
    with pytest.raises(ValueError, match="hinge"):
        losses.adversarial_loss(zero, True, "hinge")


def test_intensity_weights():
    rgb = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    assert losses.intensity(rgb).item() == pytest.approx(0.299 + 2 * 0.587 + 3 * 0.114)
    gray = torch.rand(1, 1, 2, 2)
    assert torch.equal(losses.intensity(gray), gray)


def test_gradient_map_of_a_step_edge():
    step = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4).view(1, 1, 4, 4)
    grad = losses.gradient_map(step, eps=0.0)
    # Sobel x across a unit step: 1 + 2 + 1 = 4 on both columns next to the edge, 0 elsewhere.
    assert grad[0, 0, 1].tolist() == pytest.approx([0.0, 4.0, 4.0, 0.0])


def test_generator_loss_weights_and_switches():
    real = torch.zeros(1, 1, 4, 4)
    fake = torch.full((1, 1, 4, 4), 0.5, requires_grad=True)
    logits = torch.zeros(1, 1, 2, 2)
    total, parts = losses.generator_loss(logits, real, fake, LossConfig())
    assert parts["g_l1"] == pytest.approx(50.0)  # 100 * 0.5
    assert parts["g_intensity"] == pytest.approx(15.0)  # 30 * 0.5
    assert parts["g_gradient"] == pytest.approx(0.0, abs=1e-3)  # both flat
    assert parts["g_gan"] == pytest.approx(math.log(2))
    assert total.item() == pytest.approx(sum(parts.values()))
    total.backward()
    assert fake.grad is not None
    _, ablated = losses.generator_loss(logits, real, fake, LossConfig(gradient=0, intensity=0))
    assert set(ablated) == {"g_gan", "g_l1"}


def test_discriminator_loss_is_half_the_sum():
    ones = torch.ones(1, 1, 2, 2)
    d = losses.discriminator_loss(ones * 10, -ones * 10)
    assert d.item() < 1e-4
    assert losses.discriminator_loss(ones * 0, ones * 0).item() == pytest.approx(math.log(2))


def test_relativistic_loss_compares_real_with_generated_not_each_alone():
    """RaGAN: a logit counts against the other kind's mean, so a shift of every logit by
    the same amount changes nothing (vanilla's loss would); G's loss is D's with the roles
    swapped, and its gradient reaches the generated pairs through both terms."""
    real = torch.tensor([2.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    fake = torch.tensor([-1.0, 0.0, 1.0, -2.0]).view(1, 1, 2, 2)
    d_loss = losses.discriminator_loss(real, fake, "relativistic")
    by_hand = 0.5 * (
        torch.nn.functional.softplus(-(real - fake.mean())).mean()  # -log sigmoid
        + torch.nn.functional.softplus(fake - real.mean()).mean()  # -log (1 - sigmoid)
    )
    assert d_loss.item() == pytest.approx(by_hand.item())
    shifted = losses.discriminator_loss(real + 5, fake + 5, "relativistic")
    assert shifted.item() == pytest.approx(d_loss.item())
    assert losses.discriminator_loss(real + 5, fake + 5).item() != pytest.approx(
        losses.discriminator_loss(real, fake).item()
    )
    equal = torch.zeros(1, 1, 2, 2)
    assert losses.discriminator_loss(equal, equal, "relativistic").item() == pytest.approx(
        math.log(2)
    )
    generated = fake.clone().requires_grad_(True)
    images = torch.zeros(1, 1, 4, 4)
    cfg = LossConfig(gan_mode="relativistic", l1=0, gradient=0, intensity=0)
    total, parts = losses.generator_loss(generated, images, images, cfg, real_logits=real)
    assert parts["g_gan"] == pytest.approx(
        losses.discriminator_loss(fake, real, "relativistic").item()
    )
    total.backward()
    assert generated.grad is not None and generated.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="real pairs"):
        losses.generator_loss(fake, images, images, cfg)
    scales = [real, real[..., :1]], [fake, fake[..., :1]]
    each = zip(*scales, strict=True)
    expected = sum(losses.discriminator_loss(r, f, "relativistic") for r, f in each) / 2
    assert losses.discriminator_loss(*scales, "relativistic").item() == pytest.approx(
        expected.item()
    )


def test_gradient_loss_of_magnitudes_pays_for_misplaced_texture_derivatives_do_not():
    """The paper's L1 between Sobel magnitudes is lowered by texture of the right strength
    anywhere; L1 between the derivatives only by texture where the real image has it."""
    real = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5
    elsewhere = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1)) - 0.5
    flat = torch.zeros(1, 1, 32, 32)
    weights = {"gan": 0, "l1": 0, "intensity": 0}
    magnitude = LossConfig(**weights, gradient_of="magnitude")
    derivatives = LossConfig(**weights, gradient_of="derivatives")

    def gradient_term(fake, cfg):
        return losses.generator_loss(None, real, fake, cfg)[1]["g_gradient"]

    assert gradient_term(elsewhere, magnitude) < 0.6 * gradient_term(flat, magnitude)
    assert gradient_term(elsewhere, derivatives) > gradient_term(flat, derivatives)
    assert gradient_term(real, derivatives) == pytest.approx(0, abs=1e-6)


def test_d_augment_moves_rgb_and_tir_together_is_seeded_and_lets_gradient_through():
    from tirsynth.losses import augment_pairs

    ramp = torch.arange(32.0).view(1, 1, 1, 32).expand(4, 4, 32, 32).contiguous()
    cond = ramp[:, :3].clone().requires_grad_(True)
    rgb, tir = augment_pairs(cond, ramp[:, 3:], "color,translation,cutout", seed=7)
    assert rgb.shape == (4, 3, 32, 32) and tir.shape == (4, 1, 32, 32)
    # One transform per sample for the stacked pair: the TIR moved as its RGB did.
    shifted, _ = augment_pairs(ramp[:, :3], ramp[:, 3:], "translation", seed=1)
    assert torch.equal(
        shifted[:, :1], augment_pairs(ramp[:, :3], ramp[:, 3:], "translation", seed=1)[1]
    )
    assert not torch.equal(shifted, ramp[:, :3])
    again, _ = augment_pairs(cond, ramp[:, 3:], "color,translation,cutout", seed=7)
    assert torch.equal(rgb, again)
    cut, _ = augment_pairs(torch.ones(4, 3, 32, 32), torch.ones(4, 1, 32, 32), "cutout", seed=0)
    assert ((cut == 0).float().mean(dim=(1, 2, 3)) > 0.1).all()  # each sample loses a square
    rgb.sum().backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    plain = augment_pairs(cond, ramp[:, 3:], "")
    assert plain[0] is cond and torch.equal(plain[1], ramp[:, 3:])
    with pytest.raises(ValueError, match="d_augment"):
        LossConfig(d_augment="mixup")


def test_low_pass_leaves_fine_detail_to_the_gan_and_keeps_the_low_frequencies():
    """loss.low_pass: L1 and intensity compare blurred images, so a fine checkerboard
    costs (almost) nothing there while a change of level still costs in full."""
    real = torch.zeros(1, 1, 32, 32)
    checker = (torch.arange(32).view(-1, 1) + torch.arange(32)).remainder(2) * 0.4 - 0.2
    fake = real + checker
    plain = LossConfig(gan=0, gradient=0, intensity=30, l1=100)
    blurred = LossConfig(gan=0, gradient=0, intensity=30, l1=100, low_pass=2.0)
    _, sharp_terms = losses.generator_loss(None, real, fake, plain)
    _, low_terms = losses.generator_loss(None, real, fake, blurred)
    assert sharp_terms["g_l1"] == pytest.approx(20.0)
    assert low_terms["g_l1"] < 0.5 and low_terms["g_intensity"] < 0.2
    _, level_terms = losses.generator_loss(None, real, real + 0.3, blurred)
    assert level_terms["g_l1"] == pytest.approx(30.0, rel=1e-4)
    with pytest.raises(ValueError, match="low_pass"):
        LossConfig(low_pass=-1)


def test_focal_frequency_weighs_the_frequencies_the_output_misses_most():
    """loss.focal_frequency: a fine checkerboard missing from the output costs in full at its
    one frequency, where plain L2 over the spectrum (the same as L2 in pixels) would spread
    the same weight over every frequency; a term that is off costs nothing."""
    real = (torch.arange(16).view(-1, 1) + torch.arange(16)).remainder(2) * 0.4 - 0.2
    real = real.view(1, 1, 16, 16)
    blank = torch.zeros(1, 1, 16, 16, requires_grad=True)
    cfg = LossConfig(gan=0, l1=0, gradient=0, intensity=0, focal_frequency=10)
    total, parts = losses.generator_loss(None, real, blank, cfg)
    # The checkerboard's energy, 16 * 16 * 0.2**2 = 10.24, sits at one of 256 frequencies
    # with weight 1 (the largest error): mean 10.24 / 256 = 0.04; times 10.
    assert parts["g_focal_frequency"] == pytest.approx(0.4, rel=1e-4)
    total.backward()
    assert blank.grad.abs().sum() > 0
    _, off = losses.generator_loss(None, real, blank, LossConfig(gan=0, focal_frequency=0))
    assert "g_focal_frequency" not in off
    with pytest.raises(ValueError, match="focal_frequency"):
        LossConfig(focal_frequency=-1)
