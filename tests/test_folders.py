import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from tirsynth import evaluate, generate
from tirsynth.cli import cli
from tirsynth.config import EvaluateConfig, GenerateConfig


def info(folder) -> tuple[int, str, dict]:
    runner = CliRunner()
    text = runner.invoke(cli, ["info", str(folder)])
    as_json = runner.invoke(cli, ["info", str(folder), "--json"])
    return text.exit_code, text.output, json.loads(as_json.output) if as_json.output else {}


def test_info_describes_every_folder_tirsynth_writes(
    tmp_path, learnable_shards, tiny_checkpoint, ray_session
):
    code, text, summary = info(learnable_shards)
    assert code == 0 and summary["kind"] == "pair shards" and "pairs in" in text

    for i in range(3):
        path = tmp_path / "rgb" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(path)
    (tmp_path / "rgb" / "broken.png").write_bytes(b"not an image")
    generated = tmp_path / "generated"
    generate.run(
        GenerateConfig(input=str(tmp_path / "rgb"), out=str(generated),
                       checkpoint=str(tiny_checkpoint)),
        progress=False,
    )  # fmt: skip
    code, text, summary = info(generated)
    assert code == 0 and summary["kind"] == "TIR shards"
    assert summary["outputs"] == 3 and summary["rejects"] == 1
    assert "3 generated images" in text and "rejects by reason" in text

    code, text, summary = info(tiny_checkpoint.parent.parent)
    assert code == 0 and summary["kind"] == "training run" and summary["step"] == 200
    assert "best.pt" in summary["checkpoints"] and "training run" in text

    evaluation = tmp_path / "evaluation"
    evaluate.run(
        EvaluateConfig(data=str(learnable_shards), out=str(evaluation), split="val",
                       checkpoint=str(tiny_checkpoint)),
        progress=False,
    )  # fmt: skip
    code, text, summary = info(evaluation)
    assert code == 0 and summary["kind"] == "evaluation" and "rgb-luma" in summary["ssim"]

    code, text, summary = info(tmp_path / "rgb")
    assert code == 1 and "is not a folder tirsynth wrote" in text
    assert summary["kind"] == "unknown"
