import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tirsynth import checkpoint, evaluate, inference, quality
from tirsynth.checkpoint import BUILTIN, load_checkpoint, load_generator, save_weights

SAMPLE = Path(__file__).resolve().parents[1] / "tirsynth" / "sample" / "roadscene"
# The two sample pairs in the built-in model's test split (README, "Built-in model"); it
# trained on the other six.
HELD_OUT = ("FLIR_03801", "FLIR_06506")


def test_weights_round_trip_without_pickle(tiny_checkpoint, tmp_path):
    state = load_checkpoint(tiny_checkpoint)
    path = save_weights(state, tmp_path / "tiny.safetensors")
    header_size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + header_size])  # JSON, not a pickle
    assert header["__metadata__"]["format"] == checkpoint.FORMAT
    loaded = load_checkpoint(path)
    assert loaded["config"] == state["config"]
    assert torch.equal(loaded["tir_stats"]["lbp_hist"], state["tir_stats"]["lbp_hist"])
    original, _ = load_generator(tiny_checkpoint)
    shipped, _ = load_generator(path)
    rgb = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (original(rgb) - shipped(rgb)).abs().max() < 1e-2  # float16 weights


def test_weights_of_a_checkpoint_whose_tensors_share_memory(tmp_path):
    # torch.save keeps tensors that were one tensor as one: safetensors would refuse them.
    flat = torch.full((256,), 1 / 256, dtype=torch.float64)
    config = {"model": {"depth": 3, "ngf": 4, "skips": [1]}}
    state = {"config": config, "generator": {"w": torch.ones(3)}}
    state["tir_stats"] = {"intensity_hist": flat, "lbp_hist": flat, "images": 0}
    path = checkpoint.save_checkpoint(tmp_path / "shared.pt", state)
    weights = checkpoint.weights_bytes(load_checkpoint(path), torch.float32)
    shipped = tmp_path / "shared.safetensors"
    shipped.write_bytes(weights)
    loaded = load_checkpoint(shipped)
    assert torch.equal(loaded["tir_stats"]["lbp_hist"], flat)
    assert torch.equal(loaded["generator"]["w"], torch.ones(3))


def test_loading_a_checkpoint_maps_its_tensors_instead_of_reading_them(tmp_path):
    # generate needs a checkpoint's generator only: the optimizers' moments of a large
    # checkpoint must not be read into the driver's memory.
    moments = {f"m{i}": torch.ones(16 << 20) for i in range(4)}  # 256 MiB
    path = checkpoint.save_checkpoint(tmp_path / "big.pt", {"optim_g": moments})
    del moments

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    before = resident()
    state = load_checkpoint(path)
    assert resident() - before < 64 << 20
    assert state["optim_g"]["m3"][-1].item() == 1.0  # readable all the same


def test_a_file_that_is_not_tirsynth_weights_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not tirsynth weights"):
        load_checkpoint(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a loadable safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_builtin_model_is_small_and_holds_the_recipe():
    assert BUILTIN.is_file(), f"{BUILTIN} is missing from the package"
    assert BUILTIN.stat().st_size <= 30 * 2**20
    assert (BUILTIN.parent / "LICENSE-WEIGHTS.md").is_file()
    config = load_checkpoint(BUILTIN)["config"]
    assert config["model"]["ngf"] == 32 and config["model"]["depth"] == 8
    assert config["model"]["skips"] == "sparse" and config["model"]["out_channels"] == 3
    assert config["loss"]["gradient_of"] == "derivatives"
    assert config["train"]["ema_power"] == 3.0
    # the working scale, and trained last on whole frames at it (docs/model.md)
    assert config["data"]["long_side"] == 512 == config["data"]["image_size"]


def test_builtin_model_beats_rgb_luma_on_the_held_out_sample_pairs():
    generator, state = load_generator(BUILTIN)
    data = state["config"]["data"]
    size, long_side = data["image_size"], data.get("long_side")
    model, luma = [], []
    for stem in HELD_OUT:
        rgb = Image.open(SAMPLE / "crop_LR_visible" / f"{stem}.jpg").convert("RGB")
        real = np.array(Image.open(SAMPLE / "cropinfrared" / f"{stem}.jpg").convert("L"))
        (output,) = quality.translate_pairs(generator, [{"rgb": rgb}], size, long_side=long_side)
        model.append(quality.score(real, output)["ssim"])
        luma.append(quality.score(real, evaluate._luma(np.asarray(rgb)))["ssim"])
    assert np.mean(model) > np.mean(luma) + 0.03, (model, luma)


def test_without_checkpoint_or_runs_the_builtin_model_is_used(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert inference.resolve_checkpoint(None) == BUILTIN
    assert "built-in model" in capsys.readouterr().out
