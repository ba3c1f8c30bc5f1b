"""Image quality metrics on torch tensors, one protocol everywhere (SPEC "Quality metrics").

Images are compared as single-channel 8-bit: `to_gray_uint8` maps [-1, 1] tensors to 0..255
(a 3-channel image is reduced with I = 0.299R + 0.587G + 0.114B). SSIM, PSNR and LBP agree
with scikit-image (`structural_similarity(..., data_range=255, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)`, `peak_signal_noise_ratio(..., data_range=255)`,
`local_binary_pattern(P=8, R=1, method="default")`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DATA_RANGE = 255.0
# Per-image quality fields of generated images (generate's index, reports): with a real TIR
# SSIM, PSNR and LBP; always structure and the histogram distances to real-TIR statistics.
QUALITY_FIELDS = (
    "ssim",
    "psnr",
    "lbp_real",
    "lbp_fake",
    "structure",
    "intensity_distance",
    "lbp_distance",
)
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # scikit-image: int(truncate 3.5 * sigma + 0.5) -> an 11x11 window
K1, K2 = 0.01, 0.03
LUMA = (0.299, 0.587, 0.114)  # I, the paper's intensity (Eq. 4)


def intensity(images: torch.Tensor) -> torch.Tensor:
    """I = 0.299R + 0.587G + 0.114B (Eq. 4): (B, 3, H, W) -> (B, 1, H, W); one channel as is."""
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def to_gray_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W) float64 holding integers 0..255."""
    values = (images.detach().double().clamp(-1, 1) + 1) * 127.5
    return intensity(values)[:, 0].round()  # I is linear: same before or after scaling


def ssim(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image of (B, H, W) 0..255 tensors -> (B,) float64 (Wang et al. 2004)."""
    x, y = reference.double().unsqueeze(1), test.double().unsqueeze(1)  # (B, 1, H, W)
    # One separable Gaussian blur (11 + 11 taps) over all five maps at once; a valid
    # convolution equals scikit-image's filtered image with its border cropped.
    row, column = _gaussian_kernels(x.device)
    maps = torch.cat([x, y, x * x, y * y, x * y])  # (5B, 1, H, W)
    blurred = F.conv2d(F.conv2d(maps, row), column)
    mu_x, mu_y, xx, yy, xy = blurred.chunk(5)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (numerator / denominator).mean(dim=(1, 2, 3))


def psnr(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of (B, H, W) 0..255 tensors -> (B,); inf when identical."""
    mse = ((reference.double() - test.double()) ** 2).mean(dim=(1, 2))
    return 10 * torch.log10(DATA_RANGE**2 / mse)


def lbp(images: torch.Tensor, points: int = 8, radius: float = 1.0) -> torch.Tensor:
    """Local binary pattern codes of (B, H, W) images -> (B, H, W) int64.

    Sampling points on the circle are bilinearly interpolated, zero outside the image, with
    the same arithmetic as scikit-image's `local_binary_pattern(method="default")`, so the
    codes are identical.
    """
    image = images.double()
    _, height, width = image.shape
    pad = math.ceil(radius) + 1
    padded = F.pad(image, (pad, pad, pad, pad))  # zeros: scikit-image's mode 'C', cval 0
    rows = torch.arange(height, dtype=torch.float64, device=image.device)[:, None]
    cols = torch.arange(width, dtype=torch.float64, device=image.device)[None, :]
    angles = 2 * math.pi * torch.arange(points, dtype=torch.float64) / points
    row_offsets = torch.round(-radius * torch.sin(angles), decimals=5).tolist()
    col_offsets = torch.round(radius * torch.cos(angles), decimals=5).tolist()
    codes = torch.zeros(image.shape, dtype=torch.int64, device=image.device)

    def shifted(rows_by: int, cols_by: int) -> torch.Tensor:  # (B, H, W), a view
        top, left = pad + rows_by, pad + cols_by
        return padded[:, top : top + height, left : left + width]

    for bit, (dr_offset, dc_offset) in enumerate(zip(row_offsets, col_offsets, strict=True)):
        # A sample's four neighbours sit at the same whole-pixel shift for every pixel, so
        # they are slices; its weights come from each pixel's own floating-point position,
        # as in scikit-image, where they differ in the last bits from row to row.
        r, c = rows + dr_offset, cols + dc_offset  # (H, 1), (1, W)
        dr, dc = r - torch.floor(r), c - torch.floor(c)
        r0, c0 = math.floor(dr_offset), math.floor(dc_offset)
        r1, c1 = math.ceil(dr_offset), math.ceil(dc_offset)
        top = (1 - dc) * shifted(r0, c0) + dc * shifted(r0, c1)
        bottom = (1 - dc) * shifted(r1, c0) + dc * shifted(r1, c1)
        texture = (1 - dr) * top + dr * bottom
        codes += (texture - image >= 0).long() << bit
    return codes


def lbp_histogram(codes: torch.Tensor, points: int = 8) -> torch.Tensor:
    """(B, H, W) LBP codes -> (B, 2**points) normalised histograms."""
    bins = 2**points
    counts = torch.stack([torch.bincount(c.flatten(), minlength=bins) for c in codes])
    return counts.double() / counts.sum(dim=1, keepdim=True)


def intensity_histogram(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) 0..255 images -> (B, 256) normalised intensity histograms."""
    counts = torch.stack([torch.bincount(i.flatten().long(), minlength=256) for i in images])
    return counts.double() / counts.sum(dim=1, keepdim=True)


def histogram_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total-variation distance of normalised histograms (..., bins): 0 same, 1 disjoint."""
    return 0.5 * (p - q).abs().sum(dim=-1)


def _gaussian_kernels(device) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    kernel /= kernel.sum()
    return kernel.view(1, 1, 1, -1), kernel.view(1, 1, -1, 1)  # (1, 1, 1, 11), (1, 1, 11, 1)
