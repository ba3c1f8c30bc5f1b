import numpy as np
import pytest
import torch
from conftest import SAMPLE
from PIL import Image
from skimage.feature import local_binary_pattern
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tirsynth import metrics


def skimage_ssim(a, b):
    return structural_similarity(
        a, b, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )


def random_pairs(seed=0, shape=(3, 37, 53)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    noise = rng.normal(0, 25, shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)
    return a, b


def real_pair():
    rgb = Image.open(SAMPLE / "roadscene/crop_LR_visible/FLIR_00006.jpg").convert("L")
    tir = Image.open(SAMPLE / "roadscene/cropinfrared/FLIR_00006.jpg").convert("L")
    return np.array(tir)[None], np.array(rgb)[None]


@pytest.mark.parametrize("make", [random_pairs, real_pair], ids=["random", "real"])
def test_ssim_and_psnr_match_scikit_image(make):
    a, b = make()
    ours_ssim = metrics.ssim(torch.from_numpy(a), torch.from_numpy(b))
    ours_psnr = metrics.psnr(torch.from_numpy(a), torch.from_numpy(b))
    for i in range(len(a)):
        assert abs(ours_ssim[i].item() - skimage_ssim(a[i], b[i])) < 1e-4
        assert abs(ours_psnr[i].item() - peak_signal_noise_ratio(a[i], b[i], data_range=255)) < 1e-4


def few_levels(shape):
    """Images of 0..2 only: ties everywhere, so a sample's last bit decides its code."""
    return np.random.default_rng(1).integers(0, 3, shape).astype(np.uint8), None


@pytest.mark.parametrize(
    "make",
    [
        random_pairs,
        real_pair,
        lambda: few_levels((2, 2500, 9)),  # rows far from 0, where positions lose bits
        lambda: few_levels((1, 7, 3000)),
    ],
    ids=["random", "real", "tall", "wide"],
)
def test_lbp_codes_equal_scikit_image(make):
    images, _ = make()
    ours = metrics.lbp(torch.from_numpy(images)).numpy()
    for i in range(len(images)):
        expected = local_binary_pattern(images[i], P=8, R=1, method="default")
        assert np.array_equal(ours[i], expected.astype(np.int64))


def test_hand_computed_values():
    flat = torch.full((1, 16, 16), 100.0)
    assert metrics.ssim(flat, flat).item() == pytest.approx(1.0)
    assert metrics.psnr(flat, flat + 1).item() == pytest.approx(10 * np.log10(255**2))
    # A flat image: every neighbour equals the centre (all bits set) except at the zero
    # border, where the outside samples are below it.
    codes = metrics.lbp(flat)
    assert codes[0, 8, 8].item() == 255 and codes[0, 0, 0].item() < 255
    hist = metrics.lbp_histogram(codes)
    assert hist.shape == (1, 256) and hist.sum().item() == pytest.approx(1.0)


def test_gray_reduction_uses_the_intensity_formula():
    rgb = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)  # pure red
    assert metrics.to_gray_uint8(rgb).item() == round(0.299 * 255)
    single = torch.zeros(1, 1, 1, 1)
    assert metrics.to_gray_uint8(single).item() == 128  # 127.5 rounds to even -> 128
