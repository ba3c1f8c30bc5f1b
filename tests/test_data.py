import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tirsynth import ingest
from tirsynth.config import IngestConfig
from tirsynth.data import PairDataset


@pytest.fixture
def smooth_shards(tmp_path):
    """11 pairs of smooth images, TIR = 255 - mean(RGB), in shards of 2 (all train)."""
    rgb_dir, tir_dir = tmp_path / "rgb", tmp_path / "tir"
    rgb_dir.mkdir()
    tir_dir.mkdir()
    y, x = np.mgrid[0:48, 0:64]
    for i in range(11):
        rgb = np.stack([(x * 4 + i * 7) % 256, (y * 5) % 256, (x + y + i) % 256], 2)
        rgb = rgb.astype(np.uint8)
        Image.fromarray(rgb).save(rgb_dir / f"p{i:02d}.png")
        Image.fromarray((255 - rgb.mean(2)).astype(np.uint8)).save(tir_dir / f"p{i:02d}.png")
    out = tmp_path / "shards"
    ingest.run(
        IngestConfig(
            rgb_dir=str(rgb_dir),
            tir_dir=str(tir_dir),
            out=str(out),
            shard_size=2,
            split=(1.0, 0.0, 0.0),
        )
    )
    return out


def keys_of(dataset, num_workers=0):
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [sample["key"] for sample in loader]


def test_samples_are_tensors_in_range(smooth_shards):
    sample = next(iter(PairDataset(smooth_shards, "train", image_size=16)))
    assert sample["rgb"].shape == (3, 16, 16) and sample["tir"].shape == (1, 16, 16)
    assert sample["rgb"].dtype == torch.float32
    assert -1 <= sample["rgb"].min() and sample["rgb"].max() <= 1
    assert -1 <= sample["tir"].min() and sample["tir"].max() <= 1
    assert sample["dataset"] and sample["daynight"] == "unknown"


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2), (3, 2), (4, 0)])
def test_each_sample_once_per_epoch_across_ranks_and_workers(
    smooth_shards, world_size, num_workers
):
    seen = []
    lengths = []
    for rank in range(world_size):
        dataset = PairDataset(
            smooth_shards,
            "train",
            image_size=8,
            rank=rank,
            world_size=world_size,
            shuffle=True,
            seed=3,
        )
        dataset.set_epoch(1)
        keys = keys_of(dataset, num_workers)
        assert len(keys) == len(dataset)
        lengths.append(len(keys))
        seen += keys
    assert len(set(seen)) == len(seen) == 11
    assert max(lengths) - min(lengths) <= 1


def test_even_ranks_give_every_rank_the_same_count(smooth_shards):
    lengths = [
        len(
            keys_of(
                PairDataset(smooth_shards, image_size=8, rank=r, world_size=3, even_ranks=True), 2
            )
        )
        for r in range(3)
    ]
    assert lengths == [3, 3, 3]


def test_epochs_reshuffle_reproducibly(smooth_shards):
    def order(epoch):
        dataset = PairDataset(smooth_shards, image_size=8, shuffle=True, seed=0)
        dataset.set_epoch(epoch)
        return keys_of(dataset)

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1))


def test_augmentation_crops_and_flips_rgb_and_tir_together(smooth_shards):
    dataset = PairDataset(smooth_shards, image_size=32, augment=True)
    for sample in dataset:
        rgb = (sample["rgb"] + 1) * 127.5  # back to 0..255
        tir = (sample["tir"][0] + 1) * 127.5
        # TIR was 255 - mean(RGB): a crop or flip applied to one side only would break it.
        assert (tir - (255 - rgb.mean(0))).abs().mean() < 2.0


def test_unknown_split_is_a_clear_error(smooth_shards):
    with pytest.raises(ValueError, match="no samples in split 'val'"):
        PairDataset(smooth_shards, "val")


def test_working_scale_crops_keep_the_pixel_scale_of_inference(smooth_shards):
    """With data.long_side, a 64x48 frame is resized to a long side of 128 (times up to
    load/size of jitter) and cropped, not squeezed whole into the 36 square: the red ramp
    of 4 levels per input pixel becomes about 2 per pixel, and the TIR stays registered."""
    dataset = PairDataset(
        smooth_shards, "train", image_size=32, load_size=36, long_side=128, augment=True
    )
    squeezed = PairDataset(smooth_shards, "train", image_size=32, load_size=36, augment=True)
    for sample, old in zip(dataset, squeezed, strict=True):
        assert sample["rgb"].shape == (3, 32, 32) and sample["tir"].shape == (1, 32, 32)
        red = (sample["rgb"][0].double() + 1) * 127.5
        steps = red.diff(dim=1).abs()
        slope = steps[steps < 20].median().item()  # leave out the ramp's wrap to 0
        assert 4 * 64 / (128 * 36 / 32) - 0.1 <= slope <= 4 * 64 / 128 + 0.1
        old_steps = ((old["rgb"][0].double() + 1) * 127.5).diff(dim=1).abs()
        assert old_steps[old_steps < 40].median().item() > 6  # 64 -> 36: 7 per pixel
        rgb = (sample["rgb"].double() + 1) * 127.5
        tir = (sample["tir"][0].double() + 1) * 127.5
        assert (tir - (255 - rgb.mean(0))).abs().median().item() < 3  # registered


def test_working_scale_pads_frames_shorter_than_the_crop(smooth_shards):
    dataset = PairDataset(smooth_shards, "train", image_size=32, long_side=24, augment=True)
    sample = next(iter(dataset))
    assert sample["rgb"].shape == (3, 32, 32) and sample["tir"].shape == (1, 32, 32)
