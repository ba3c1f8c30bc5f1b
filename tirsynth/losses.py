"""Losses of the sparse GAN (paper Eq. 1-7): adversarial, L1, gradient and intensity."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from focal_frequency_loss import FocalFrequencyLoss

from tirsynth import metrics
from tirsynth.config import LossConfig
from tirsynth.metrics import intensity

focal_frequency_loss = FocalFrequencyLoss()  # the paper's defaults: alpha 1, whole image

GanMode = Literal["vanilla", "lsgan", "relativistic"]
SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


Logits = torch.Tensor | list[torch.Tensor]  # one PatchGAN's map, or one per scale


def adversarial_loss(logits: Logits, real: bool, mode: GanMode = "vanilla") -> torch.Tensor:
    """GAN loss of discriminator logits against an all-real or all-fake target.

    vanilla: binary cross-entropy on logits; used for G with `real=True` it is the
    non-saturating loss, -log D(x, G(x)). lsgan: least squares. A multi-scale D's maps
    count equally, averaged, so that loss.gan keeps its weight against the other terms.
    """
    if isinstance(logits, list):
        return sum(adversarial_loss(x, real, mode) for x in logits) / len(logits)
    logits = logits.float()  # D may have run under bf16 autocast; the loss is in fp32
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(logits, target)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    raise ValueError(f"gan mode {mode!r} is not vanilla or lsgan (relativistic compares two)")


def sobel(gray: torch.Tensor) -> torch.Tensor:
    """Sobel derivatives of (B, 1, H, W) -> (B, 2, H, W) (x, y), edges replicated."""
    kernel_x = SOBEL_X.to(gray)
    kernels = torch.stack([kernel_x, kernel_x.T]).unsqueeze(1)  # (2, 1, 3, 3)
    return F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)


def gradient_map(gray: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRA: Sobel gradient magnitude of (B, 1, H, W) -> (B, 1, H, W), edges replicated."""
    # eps keeps the square root differentiable where the image is flat.
    return torch.sqrt((sobel(gray) ** 2).sum(dim=1, keepdim=True) + eps)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred by a separable Gaussian of `sigma` pixels (3 sigma each side,
    reflected at the border); sigma 0 returns the images."""
    if not sigma:
        return images
    radius = max(1, int(3 * sigma + 0.5))
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def generator_loss(
    fake_logits: Logits | None,
    real: torch.Tensor,
    fake: torch.Tensor,
    cfg: LossConfig,
    real_logits: Logits | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """G's objective (Eq. 7): gan + l1 * L1 + gradient * L1(GRA) + intensity * L1(I).

    A term whose weight is 0 is not computed at all. `real_logits`, D's on the real pairs,
    only for the relativistic GAN loss: G's term is then D's with the roles swapped.

    Returns:
        (the total to backpropagate, each weighted term as a float for logging).
    """
    terms: dict[str, torch.Tensor] = {}
    if cfg.gan and fake_logits is not None and cfg.gan_mode == "relativistic":
        if real_logits is None:
            raise ValueError("the relativistic GAN loss needs D's logits on the real pairs")
        terms["g_gan"] = cfg.gan * discriminator_loss(fake_logits, real_logits, cfg.gan_mode)
    elif cfg.gan and fake_logits is not None:
        terms["g_gan"] = cfg.gan * adversarial_loss(fake_logits, True, cfg.gan_mode)
    low_fake, low_real = gaussian_blur(fake, cfg.low_pass), gaussian_blur(real, cfg.low_pass)
    if cfg.l1:
        terms["g_l1"] = cfg.l1 * F.l1_loss(low_fake, low_real)
    if cfg.gradient or cfg.intensity or cfg.ssim:
        real_i, fake_i = intensity(real), intensity(fake)
        if cfg.ssim:
            # The metric's own SSIM (11x11 Gaussian window) on the 0..255 scale.
            score = metrics.ssim(((real_i + 1) * 127.5)[:, 0], ((fake_i + 1) * 127.5)[:, 0])
            terms["g_ssim"] = cfg.ssim * (1 - score.mean()).float()
        if cfg.intensity:
            low = intensity(low_fake), intensity(low_real)
            terms["g_intensity"] = cfg.intensity * F.l1_loss(*low)
        if cfg.gradient and cfg.gradient_of == "magnitude":
            terms["g_gradient"] = cfg.gradient * F.l1_loss(
                gradient_map(fake_i), gradient_map(real_i)
            )
        elif cfg.gradient:
            # Derivatives, not magnitudes: texture where the real image has none, or an
            # edge of the wrong polarity, costs instead of paying.
            terms["g_gradient"] = cfg.gradient * F.l1_loss(sobel(fake_i), sobel(real_i))
    if cfg.focal_frequency:
        # FFT has no bfloat16 kernels; the spectra of float32 images.
        spectra = focal_frequency_loss(fake.float(), real.float())
        terms["g_focal_frequency"] = cfg.focal_frequency * spectra
    total = sum(terms.values(), fake.new_zeros(()))
    return total, {name: value.item() for name, value in terms.items()}


def discriminator_loss(
    real_logits: Logits, fake_logits: Logits, mode: GanMode = "vanilla"
) -> torch.Tensor:
    """D's loss: half the sum of its losses on real and on fake pairs (as pix2pix).

    relativistic: the relativistic average GAN (Jolicoeur-Martineau 2019, as ESRGAN): D
    judges whether a real pair looks more real than the generated ones do on average, and
    a generated pair less real than the real ones; each logit less the mean of the other
    kind's. Swapping the arguments gives G's loss, whose gradient then flows through both
    terms.
    """
    if mode == "relativistic":
        return 0.5 * (
            _relativistic_loss(real_logits, fake_logits, True)
            + _relativistic_loss(fake_logits, real_logits, False)
        )
    return 0.5 * (
        adversarial_loss(real_logits, True, mode) + adversarial_loss(fake_logits, False, mode)
    )


def _relativistic_loss(logits: Logits, others: Logits, real: bool) -> torch.Tensor:
    """BCE of each logit less the mean of `others` (the same scale's) against `real`."""
    if isinstance(logits, list):
        pairs = zip(logits, others, strict=True)
        return sum(_relativistic_loss(x, y, real) for x, y in pairs) / len(logits)
    relative = logits.float() - others.float().mean()
    target = torch.ones_like(relative) if real else torch.zeros_like(relative)
    return F.binary_cross_entropy_with_logits(relative, target)


def augment_pairs(
    cond: torch.Tensor, tir: torch.Tensor, policy: str, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffAugment (Zhao et al. 2020, their official transforms) of the pairs D sees.

    RGB and TIR are stacked and transformed together, so that a pair stays registered;
    every sample draws its own transform. Differentiable: G's gradient passes through.
    The same `seed` gives the same transforms (feature matching compares a real and a
    generated pair under one transform).

    Args:
        cond, tir: (B, C, H, W) in -1..1.
        policy: comma-separated of color (brightness and contrast), translation (up to
            1/8 of the side, zero-filled), cutout (a zeroed square of half the side).
    """
    if not policy:
        return cond, tir
    generator = torch.Generator(device=cond.device)
    generator.manual_seed(int(torch.randint(1 << 62, ())) if seed is None else seed)
    x = torch.cat([cond, tir], dim=1)
    for name in policy.split(","):
        x = _AUGMENT[name](x, generator)
    return x[:, : cond.shape[1]], x[:, cond.shape[1] :]


def _rand(x: torch.Tensor, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(x.shape[0], *shape, generator=generator, device=x.device, dtype=x.dtype)


def _color(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    x = x + (_rand(x, generator, 1, 1, 1) - 0.5)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, generator, 1, 1, 1) + 0.5) + mean


def _translation(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.125):
    batch, _, height, width = x.shape
    reach_y, reach_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    shift_y = torch.randint(-reach_y, reach_y + 1, (batch, 1, 1), generator=generator,
                            device=x.device)  # fmt: skip
    shift_x = torch.randint(-reach_x, reach_x + 1, (batch, 1, 1), generator=generator,
                            device=x.device)  # fmt: skip
    grid_b, grid_y, grid_x = torch.meshgrid(
        torch.arange(batch, device=x.device),
        torch.arange(height, device=x.device),
        torch.arange(width, device=x.device),
        indexing="ij",
    )
    grid_y = torch.clamp(grid_y + shift_y + 1, 0, height + 1)
    grid_x = torch.clamp(grid_x + shift_x + 1, 0, width + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[grid_b, grid_y, grid_x].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.5):
    batch, _, height, width = x.shape
    size_y, size_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    top = torch.randint(0, height + (1 - size_y % 2), (batch, 1, 1), generator=generator,
                        device=x.device)  # fmt: skip
    left = torch.randint(0, width + (1 - size_x % 2), (batch, 1, 1), generator=generator,
                         device=x.device)  # fmt: skip
    rows = torch.arange(height, device=x.device).view(1, -1, 1) - top + size_y // 2
    cols = torch.arange(width, device=x.device).view(1, 1, -1) - left + size_x // 2
    inside = (rows >= 0) & (rows < size_y) & (cols >= 0) & (cols < size_x)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_AUGMENT = {"color": _color, "translation": _translation, "cutout": _cutout}
