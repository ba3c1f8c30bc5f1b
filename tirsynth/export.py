"""Generated TIR shards in; a plain folder tree mirroring the input, labels beside, out.

For tools that want files: each output is written as `<input relative path>.png`
(8-bit single-channel), with the labels in the input's own format (COCO json in
annotations/, YOLO txt in labels/).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm import tqdm

from tirsynth import shards
from tirsynth.corpus import COCO_PREFIX, output_relpath
from tirsynth.shards import atomic_output


def run(generated: str | Path, to: str | Path, progress: bool = True) -> int:
    """Write every output of a `tirsynth generate` folder under `to`.

    Returns:
        The number of images written.
    """
    generated, to = Path(generated), Path(to)
    manifest = shards.read_manifest(generated)
    if manifest is None or manifest.get("stage") != "generate":
        raise ValueError(f"{generated} is not the output of `tirsynth generate`")
    if manifest["status"] != "complete":
        raise ValueError(f"{generated}: generation is incomplete; run it again to finish it")
    shard_column = shards.read_arrow(generated / shards.INDEX, ["shard"])["shard"]
    written = 0
    bar = tqdm(total=len(shard_column), disable=not progress, unit="img", desc="export")
    for shard in sorted(shard_column.unique().to_pylist()):
        for sample in shards.read_shard(generated / shard):
            record = json.loads(sample["json"])
            _write(to / output_relpath(record["relpath"]), sample["tir.png"])
            yolo = record["labels"].get("yolo")
            if yolo is not None:
                _write(to / record["labels"]["label_file"], yolo.encode())
            written += 1
            bar.update(1)
    bar.close()
    for coco_file in sorted(generated.glob(f"{COCO_PREFIX}*.json")):
        target = to / "annotations" / coco_file.name.removeprefix(COCO_PREFIX)
        _write(target, coco_file.read_bytes())
    if manifest["input_kind"] == "yolo":
        for dataset_yaml in Path(manifest["input"]).glob("*.yaml"):
            shutil.copyfile(dataset_yaml, to / dataset_yaml.name)
    return written


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, durable=False) as handle:
        handle.write(data)
