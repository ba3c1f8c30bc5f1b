"""Generated TIR shards in; a plain folder tree mirroring the input, labels beside, out.

For tools that want files: each output is written as `<input relative path>.png`
(8-bit single-channel), with the labels in the input's own format (COCO json in
annotations/, YOLO txt in labels/). Every target is built from a cleaned relative path and
checked to lie inside `to`, whatever the shards say (`containment.target_inside`).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from tqdm import tqdm

from tirsynth import shards
from tirsynth.containment import inside, target_inside
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
    index = shards.read_arrow(generated / shards.INDEX, ["shard", "shard_bytes"])
    damaged = shards.damaged_shards(generated, index)
    if damaged:  # found before anything is written
        raise shards.DamagedFile(
            f"{generated}: {len(damaged)} shards missing or not the size committed "
            f"({', '.join(damaged[:3])}); export wrote nothing; run the same generate again "
            "to redo them"
        )
    shard_column = index["shard"]
    written = 0
    bar = tqdm(total=len(shard_column), disable=not progress, unit="img", desc="export")
    for shard in sorted(shard_column.unique().to_pylist()):
        for sample in _samples(generated / shard):
            record = json.loads(sample["json"])
            _write(target_inside(to, output_relpath(record["relpath"])), sample["tir.png"])
            yolo = record["labels"].get("yolo")
            if yolo is not None:
                _write(target_inside(to, record["labels"]["label_file"]), yolo.encode())
            written += 1
            bar.update(1)
    bar.close()
    for coco_file in sorted(generated.glob(f"{COCO_PREFIX}*.json")):
        target = target_inside(to, f"annotations/{coco_file.name.removeprefix(COCO_PREFIX)}")
        _write(target, coco_file.read_bytes())
    if manifest["input_kind"] == "yolo":
        source = Path(manifest["input"])
        for dataset_yaml in sorted(source.glob("*.yaml")):
            if inside(source, dataset_yaml):  # a link to a file elsewhere is not copied out
                _write(target_inside(to, dataset_yaml.name), dataset_yaml.read_bytes())
    return written


def _samples(shard: Path):
    try:
        yield from shards.read_shard(shard)
    except (tarfile.TarError, ValueError, KeyError, EOFError) as error:
        raise shards.damaged(shard, "damaged tar", error) from error


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, durable=False) as handle:
        handle.write(data)
