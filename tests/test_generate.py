import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smooth_rgb
from PIL import Image

from tirsynth import export, generate, inference, shards
from tirsynth.checkpoint import load_checkpoint, weights_bytes
from tirsynth.config import GenerateConfig
from tirsynth.corpus import discover_corpus
from tirsynth.losses import gradient_map

SIZES = [(64, 48), (45, 77), (100, 30), (33, 33)]


def write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = smooth_rgb(np.random.default_rng(seed), max(size))
    Image.fromarray(rgb[: size[1], : size[0]]).save(path)


def make_coco(root: Path) -> dict:
    coco = {
        "info": {"description": "synthetic"},
        "categories": [{"id": 1, "name": "car"}],
        "images": [],
        "annotations": [],
    }
    for i, (w, h) in enumerate(SIZES):
        name = f"{i:012d}.jpg"
        write_image(root / "val" / name, (w, h), i)
        coco["images"].append({"id": 100 + i, "file_name": name, "width": w, "height": h})
        coco["annotations"].append(
            {
                "id": 500 + i,
                "image_id": 100 + i,
                "category_id": 1,
                "bbox": [1.5, 2.0, w / 3, h / 4],
                "area": w * h / 12,
                "iscrowd": 0,
            }
        )
    coco["images"].append({"id": 999, "file_name": "missing.jpg", "width": 5, "height": 5})
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return coco


def make_yolo(root: Path) -> dict[str, str]:
    labels = {}
    for i, (w, h) in enumerate(SIZES):
        write_image(root / "images" / "train" / f"img {i}.png", (w, h), 10 + i)
        if i < 3:  # the last image has no label file: a YOLO background image
            text = f"0 0.5 0.5 0.25 0.3\n{i} 0.1 0.2 0.05 0.06\n"
            (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
            (root / "labels" / "train" / f"img {i}.txt").write_text(text)
            labels[f"img {i}"] = text
    (root / "labels" / "train" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "data.yaml").write_text("names: [car]\n")
    return labels


def generate_cfg(source, out, checkpoint, **options) -> GenerateConfig:
    return GenerateConfig(
        input=str(source),
        out=str(out),
        checkpoint=str(checkpoint),
        batch_size=3,
        shard_size=2,
        **options,
    )


def test_translator_on_a_numpy_batch_without_ray(tiny_checkpoint):
    translator = inference.Translator(str(tiny_checkpoint), precision="fp32")
    batch = {
        "key": np.array(["a", "b"], dtype=object),
        "pixels": np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8),
    }
    out = translator(batch)
    assert out["tir"].shape == (2, 32, 32) and out["tir"].dtype == np.uint8
    assert list(out["key"]) == ["a", "b"]


@pytest.mark.parametrize("size", [(64, 48), (45, 77), (7, 300), (1, 1)])
def test_fit_and_map_back_keep_the_exact_input_size(size):
    image = Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8))
    square, content = inference.fit_to_square(image, 32)
    assert square.shape == (32, 32, 3) and max(content) == 32
    assert inference.map_back(square[..., 0], content, size).shape == (size[1], size[0])


def test_coco_labels_arrive_unchanged_and_point_to_outputs(tmp_path, tiny_checkpoint, ray_session):
    coco = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    result = generate.run(generate_cfg(tmp_path / "coco", out, tiny_checkpoint), progress=False)
    assert result.generated == len(SIZES) and result.total == len(SIZES)
    assert [r["reason"] for r in result.rejects] == ["image named in COCO json not found"]
    written = json.loads((out / "coco_instances_val.json").read_text())
    assert written["annotations"] == coco["annotations"]
    assert written["categories"] == coco["categories"]
    index = {row["key"]: row for row in shards.read_index(out)}
    for entry, original in zip(written["images"], coco["images"], strict=False):
        assert entry["id"] == original["id"] and entry["file_name"].endswith(".png")
        row = index[entry["tirsynth_key"]]
        assert (row["width"], row["height"]) == (original["width"], original["height"])
    # Every sample's json carries its own annotations, unchanged.
    for shard in {row["shard"] for row in index.values()}:
        for sample in shards.read_shard(out / shard):
            record = json.loads(sample["json"])
            image_id = record["labels"]["coco"]["image"]["id"]
            expected = [a for a in coco["annotations"] if a["image_id"] == image_id]
            assert record["labels"]["coco"]["annotations"] == expected
            tir = Image.open(__import__("io").BytesIO(sample["tir.png"]))
            assert tir.mode == "L" and tir.size == (record["width"], record["height"])
            assert 0 <= record["metrics"]["structure"] <= 1
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"] == len(SIZES) and report["batches"]
    # The model's own time, and its share of the pipeline's (one replica here).
    assert report["model_seconds_per_image"] > 0 and 0 < report["model_share"] <= 1.05
    assert report["overall"]["structure"] is not None

    folder = tmp_path / "exported"
    assert export.run(out, folder, progress=False).images == len(SIZES)
    exported = json.loads((folder / "annotations" / "instances_val.json").read_text())
    assert exported["annotations"] == coco["annotations"]
    for entry in exported["images"]:
        with Image.open(folder / entry["file_name"]) as image:
            assert image.size == (entry["width"], entry["height"])


def test_yolo_labels_arrive_unchanged(tmp_path, tiny_checkpoint, ray_session):
    labels = make_yolo(tmp_path / "yolo")
    out = tmp_path / "out"
    result = generate.run(generate_cfg(tmp_path / "yolo", out, tiny_checkpoint), progress=False)
    assert result.generated == len(SIZES)
    assert [r["reason"] for r in result.rejects] == ["labels without an image"]
    folder = tmp_path / "exported"
    export.run(out, folder, progress=False)
    for i, (w, h) in enumerate(SIZES):
        with Image.open(folder / "images" / "train" / f"img {i}.png") as image:
            assert image.size == (w, h) and image.mode == "L"
        label_file = folder / "labels" / "train" / f"img {i}.txt"
        assert label_file.read_text() == labels.get(f"img {i}", "")
    assert (folder / "data.yaml").read_text() == "names: [car]\n"


def test_bright_square_edges_stay_in_place(tmp_path, tiny_checkpoint, ray_session):
    """The output's strongest edges outline the input's bright square, where it was."""
    pixels = np.full((64, 96, 3), 40, np.uint8)
    left, top, right, bottom = 30, 20, 62, 44  # the square covers [left, right) x [top, bottom)
    pixels[top:bottom, left:right] = 230
    (tmp_path / "in").mkdir()
    Image.fromarray(pixels).save(tmp_path / "in" / "square.png")
    generate.run(
        generate_cfg(
            tmp_path / "in", tmp_path / "out", tiny_checkpoint, long_side=64, keep_rgb=True
        ),
        progress=False,
    )
    sample = next(shards.read_shard(next((tmp_path / "out").glob("tir-*.tar"))))
    assert sample["rgb.png"] == (tmp_path / "in" / "square.png").read_bytes()  # --keep-rgb
    tir = np.asarray(Image.open(__import__("io").BytesIO(sample["tir.png"])), np.float64)
    assert tir.shape == (64, 96)
    edges = gradient_map(torch.from_numpy(tir / 255)[None, None])[0, 0].numpy()
    strong = edges > 0.5 * edges.max()
    rows, cols = np.nonzero(strong)
    assert abs(rows.min() - top) <= 3 and abs(rows.max() - (bottom - 1)) <= 3
    assert abs(cols.min() - left) <= 3 and abs(cols.max() - (right - 1)) <= 3
    inside = np.zeros_like(strong)
    inside[top + 4 : bottom - 4, left + 4 : right - 4] = True
    assert not (strong & inside).any()  # no edges in the square's flat interior


def test_bad_inputs_are_rejected_with_reasons_and_the_run_goes_on(
    tmp_path, tiny_checkpoint, ray_session
):
    source = tmp_path / "in"
    write_image(source / "good.png", (40, 30), 0)
    write_image(source / "big.png", (300, 300), 1)
    (source / "empty.jpg").write_bytes(b"")
    (source / "notes.txt").write_text("not an image")
    (source / "fake.png").write_text("not an image either")
    good = (source / "good.png").read_bytes()
    (source / "truncated.png").write_bytes(good[: len(good) // 2])
    cfg = generate_cfg(source, tmp_path / "out", tiny_checkpoint, max_pixels=50_000)
    result = generate.run(cfg, progress=False)
    reasons = {Path(r["path"]).name: r["reason"] for r in result.rejects}
    assert result.generated == 1
    assert reasons["notes.txt"] == "not an image file"
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["fake.png"].startswith("not an image")
    assert reasons["big.png"].startswith("image too large")
    assert reasons["truncated.png"].startswith("truncated")
    # A rerun finds everything done: nothing generated, nothing duplicated.
    again = generate.run(cfg, progress=False)
    assert again.generated == 0 and again.total == 1 and len(again.rejects) == len(reasons)


def test_min_structure_moves_outputs_to_rejects(tmp_path, tiny_checkpoint, ray_session):
    write_image(tmp_path / "in" / "a.png", (40, 30), 0)
    result = generate.run(
        generate_cfg(tmp_path / "in", tmp_path / "out", tiny_checkpoint, min_structure=1.0),
        progress=False,
    )
    assert result.total == 0
    assert result.rejects[0]["reason"].startswith("structure below --min-structure 1.0")


def test_default_run_rejects_no_readable_image(tmp_path, tiny_checkpoint, ray_session):
    """Every quality gate is off by default: random noise, whose structure score (an SSIM)
    is often negative, converts in full."""
    rng = np.random.default_rng(0)
    for i in range(12):
        path = tmp_path / "in" / f"noise{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)).save(path)
    cfg = generate_cfg(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    assert cfg.min_structure is None
    result = generate.run(cfg, progress=False)
    assert result.total == 12 and result.rejects == []


def test_pair_shards_input_is_scored_against_the_real_tir(
    tmp_path, learnable_shards, tiny_checkpoint, ray_session
):
    result = generate.run(
        generate_cfg(learnable_shards, tmp_path / "out", tiny_checkpoint, split="val"),
        progress=False,
    )
    rows = shards.read_index(tmp_path / "out")
    assert len(rows) == len(discover_corpus(learnable_shards, split="val").images())
    assert all(row["ssim"] > 0.5 and row["psnr"] > 15 for row in rows)  # a trained mapping
    assert result.report["overall"]["ssim"] > 0.5


def test_list_input_and_bf16_agreement(tmp_path, tiny_checkpoint, ray_session):
    """A text list of paths is an input; bf16 outputs match fp32 (SSIM >= 0.99) on real
    RGB images, which is what makes bf16 the CPU default."""
    from conftest import SAMPLE

    from tirsynth.bench import precision_agreement

    real = sorted((SAMPLE / "roadscene" / "crop_LR_visible").iterdir())
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two real images and a missing one\n{real[0]}\n{real[1]}\nnope.jpg\n")
    result = generate.run(generate_cfg(listing, tmp_path / "out", tiny_checkpoint), progress=False)
    assert result.generated == 2 and result.rejects[0]["reason"] == "file listed but missing"
    low, mean = precision_agreement(tiny_checkpoint, real[0].parent, "bf16", 32)
    assert low >= 0.99


def test_checkpoint_discovery(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inference, "BUILTIN", tmp_path / "not-installed.safetensors")
    with pytest.raises(FileNotFoundError, match="tirsynth train"):
        inference.resolve_checkpoint(None)
    target = tmp_path / "runs" / "a" / "checkpoints" / "best.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(tiny_checkpoint.read_bytes())
    assert inference.resolve_checkpoint(None) == Path("runs/a/checkpoints/best.pt")


def test_killed_generate_resumes_without_duplicates_or_gaps(tmp_path, tiny_checkpoint):
    source = tmp_path / "in"
    for i in range(48):
        write_image(source / f"d{i // 16}" / f"im{i:02d}.png", (160, 120), i)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "tirsynth.cli",
        "generate",
        "--input",
        str(source),
        "--out",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--batch-size",
        "2",
        "--cpu-batch",
        "2",
        "--shard-size",
        "2",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if len(shards.read_index(out)) if (out / "index.parquet").exists() else 0:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
    process.wait()
    partial = len(shards.read_index(out))
    assert 0 < partial < 48, "the kill should land mid-run"
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    # Quiet: Ray's own warnings and error-level lines go to OUT/ray.log, not the terminal.
    noise = [line for line in finished.stderr.splitlines() if "WARNING" in line or " E " in line
             or "ERROR" in line]  # fmt: skip
    assert not noise, noise
    assert "generate:" in finished.stderr  # our progress bar still shows
    assert "Ray" in (out / "ray.log").read_text()
    rows = shards.read_index(out)
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)) == 48
    stored = [s["__key__"] for p in sorted(out.glob("tir-*.tar")) for s in shards.read_shard(p)]
    assert sorted(stored) == sorted(keys)  # no orphan shard, no sample outside the index
    assert not list(out.glob(".*.tmp"))


def test_resume_with_other_output_options_is_refused(tmp_path, tiny_checkpoint, ray_session):
    write_image(tmp_path / "in" / "a.png", (40, 30), 0)
    cfg = generate_cfg(tmp_path / "in", tmp_path / "out", tiny_checkpoint, precision="fp32")
    generate.run(cfg, progress=False)
    # A touched checkpoint (same bytes) is the same checkpoint: the rerun resumes.
    os.utime(tiny_checkpoint)
    assert generate.run(cfg, progress=False).generated == 0
    other = generate_cfg(tmp_path / "in", tmp_path / "out", tiny_checkpoint, precision="bf16")
    with pytest.raises(FileExistsError, match="precision 'fp32' -> 'bf16'.*--overwrite"):
        generate.run(other, progress=False)


def test_any_per_image_failure_becomes_that_images_reject(tmp_path, monkeypatch):
    """A codec bug (any exception, not only ImageRejected) costs one image, with its text."""
    for name in ("a", "bad", "c"):
        write_image(tmp_path / f"{name}.png", (20, 16), 0)
    real_decode = inference.decode_rgb

    def flaky_codec(data, max_pixels):
        image = real_decode(data, max_pixels)
        if image.size == (20, 16) and flaky_codec.calls == 1:
            flaky_codec.calls += 1
            raise RuntimeError("codec exploded")
        flaky_codec.calls += 1
        return image

    flaky_codec.calls = 0
    monkeypatch.setattr(inference, "decode_rgb", flaky_codec)
    batch = {
        "key": np.array(["a", "bad", "c"], dtype=object),
        "path": np.array([str(tmp_path / f"{n}.png") for n in ("a", "bad", "c")], dtype=object),
        "shard": np.array(["", "", ""], dtype=object),
    }
    out = generate.preprocess_batch(batch, 16, str(tmp_path), 10**8, False)
    assert list(out["error"]) == ["", "failed: RuntimeError: codec exploded", ""]
    assert out["width"].tolist() == [20, 0, 20]


def test_transient_read_errors_are_retried_then_marked_retryable(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "a.png"
    write_image(path, (20, 16), 0)
    real_read = Path.read_bytes
    failures = {"left": 1}

    def flaky_read(self):
        if self == path and failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", flaky_read)
    assert generate.read_with_retries(path) == real_read(path)  # failed once, then read
    failures["left"] = 10
    batch = {"key": np.array(["a"], dtype=object), "path": np.array([str(path)], dtype=object),
             "shard": np.array([""], dtype=object)}  # fmt: skip
    out = generate.preprocess_batch(batch, 16, str(tmp_path), 10**8, False)
    assert out["error"][0] == "unreadable file (retryable): Input/output error"
    missing = {**batch, "path": np.array([str(tmp_path / "gone.png")], dtype=object)}
    error = generate.preprocess_batch(missing, 16, str(tmp_path), 10**8, False)["error"][0]
    assert error.startswith("unreadable file: ") and "retryable" not in error


def test_retry_rejects_reprocesses_earlier_rejects(tmp_path, tiny_checkpoint, ray_session):
    write_image(tmp_path / "in" / "a.png", (40, 30), 0)
    (tmp_path / "in" / "b.png").write_bytes(b"half a file")  # e.g. still being copied
    cfg = generate_cfg(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    first = generate.run(cfg, progress=False)
    assert first.total == 1 and len(first.rejects) == 1
    write_image(tmp_path / "in" / "b.png", (40, 30), 1)
    assert generate.run(cfg, progress=False).total == 1  # a plain resume skips rejects
    retried = generate.run(GenerateConfig(**{**cfg.__dict__, "retry_rejects": True}),
                           progress=False)  # fmt: skip
    assert retried.total == 2 and retried.rejects == [] and retried.generated == 1


def test_model_threads_come_from_each_node_not_the_whole_cluster():
    def node(cpus, alive=True):
        return {"Alive": alive, "Resources": {"CPU": cpus}}

    assert generate._threads_per_replica([node(2)], 1) == 2
    # Two 16-CPU nodes, two replicas: one per node, 16 threads each (not 32 // 2 on one).
    assert generate._threads_per_replica([node(16), node(16)], 2) == 16
    assert generate._threads_per_replica([node(16), node(16)], 4) == 8
    assert generate._threads_per_replica([node(8), node(16), node(4, alive=False)], 2) == 8


def test_translator_loads_a_checkpoint_shipped_as_bytes(tiny_checkpoint):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    by_path = inference.Translator(str(tiny_checkpoint), "fp32")({"pixels": pixels})["tir"]
    shipped = inference.Translator("moved.pt", "fp32", shipped=tiny_checkpoint.read_bytes())(
        {"pixels": pixels}
    )["tir"]
    assert np.array_equal(by_path, shipped)

    # What generate ships: the generator's weights alone, at full precision, the same model.
    weights = weights_bytes(load_checkpoint(tiny_checkpoint), torch.float32)
    assert len(weights) < tiny_checkpoint.stat().st_size / 3
    from_weights = inference.Translator("moved.safetensors", "fp32", shipped=weights)(
        {"pixels": pixels}
    )["tir"]
    assert np.array_equal(by_path, from_weights)


def test_generate_across_a_two_node_cluster(tmp_path, tiny_checkpoint):
    """Two Ray nodes on this machine (ray.cluster_utils.Cluster, in its own process: this
    session already runs a Ray of its own); shards from workers on both land in one index."""
    source, out = tmp_path / "in", tmp_path / "out"
    for i in range(24):
        write_image(source / f"im{i:02d}.png", (48, 40), i)
    script = f"""
from ray.cluster_utils import Cluster
from tirsynth import generate
from tirsynth.config import GenerateConfig
store = 150 * 2**20
cluster = Cluster(initialize_head=True,
                  head_node_args={{"num_cpus": 2, "object_store_memory": store}})
cluster.add_node(num_cpus=2, object_store_memory=store)
cluster.wait_for_nodes()
try:
    generate.run(GenerateConfig(input={str(source)!r}, out={str(out)!r},
                                checkpoint={str(tiny_checkpoint)!r}, batch_size=2, cpu_batch=2,
                                shard_size=1, workers=2, address=cluster.address),
                 progress=False)
finally:
    cluster.shutdown()
"""
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=400)  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = shards.read_index(out)
    assert sorted(r["key"] for r in rows) == sorted(f"im{i:02d}" for i in range(24))
    assert len({r["node"] for r in rows}) == 2  # both nodes' workers wrote shards


def test_cpu_batch_model_batch_and_concurrency_are_separate_knobs(
    tmp_path, tiny_checkpoint, ray_session, monkeypatch
):
    for i in range(7):
        write_image(tmp_path / "in" / f"im{i}.png", (40, 30), i)
    cfg = GenerateConfig(
        input=str(tmp_path / "in"), out=str(tmp_path / "out"), checkpoint=str(tiny_checkpoint),
        batch_size=2, cpu_batch=3, concurrency=1, shard_size=4,
    )  # fmt: skip
    # A group of 3 images makes 3 + 2 + 1 blocks: two groups a window, the last one alone.
    monkeypatch.setattr(generate, "WINDOW_BLOCKS", 13)
    assert generate.window_groups(3, 2, 4) == 2
    windows = []
    original_range = ray_session.data.range
    monkeypatch.setattr(
        ray_session.data, "range", lambda n, **kw: windows.append(n) or original_range(n, **kw)
    )
    result = generate.run(cfg, progress=False)
    keys = sorted(row["key"] for row in shards.read_index(tmp_path / "out"))
    assert result.generated == 7 and keys == [f"im{i}" for i in range(7)]
    assert windows == [2, 1]  # every group once, over two pipelines
    assert not (tmp_path / "out" / generate.LISTING).exists()  # the run's listing is gone
    # The pipeline ran under a budget that binds, so shards were committed all along.
    limits = ray_session.data.DataContext.get_current().execution_options.resource_limits
    assert limits.object_store_memory == generate.streaming_budget(2, 3, 32)
    with pytest.raises(ValueError, match="cpu_batch"):
        GenerateConfig(input="x", cpu_batch=0)


def test_run_totals_of_an_earlier_index_equal_its_rows_sums():
    rows = [{"key": "a", "ssim": 0.5, "structure": 0.25}, {"key": "b", "ssim": None,
             "structure": 0.75}]  # fmt: skip
    totals = generate.RunTotals()
    totals.add_table(shards.tables.from_rows(rows))
    sums = generate.metric_sums(rows)
    assert totals.outputs == 2
    assert totals.sums["ssim"] == sums["ssim_sum"] and totals.counts["ssim"] == 1
    assert totals.means()["structure"] == 0.5


def test_windows_bound_the_blocks_of_one_pipeline():
    # Defaults on the CPU: 3 + 32/8 + 32/256 -> 8 blocks a group.
    assert generate.window_groups(32, 8, 256) == generate.WINDOW_BLOCKS // 8
    assert generate.window_groups(32, 64, 2) == generate.WINDOW_BLOCKS // 20
    assert generate.window_groups(10**6, 1, 1) == 1


def test_streaming_budget_is_a_few_batches_per_cpu_and_stage():
    batch = 32 * 256 * 256 * 3 * 2
    assert generate.streaming_budget(16, 32, 256) == 4 * 2 * 16 * batch
    assert generate.streaming_budget(2, 32, 32) == generate.MIN_STREAMING_BUDGET


def test_run_totals_series_stays_bounded_with_equal_points():
    """100,000 shards (a 200,000-image run at 2 a shard): at most MAX_POINTS points, each
    but the last covering the same number of shards, and a steady rate that is the run's."""
    totals = generate.RunTotals()
    summary = {"images": 2, "rejected": 0, "reasons": "{}"}
    summary |= {f"{f}_{k}": 0 for f in generate.metrics.QUALITY_FIELDS for k in ("sum", "count")}
    for shard in range(100_000):
        totals.add_shard(summary, seconds=shard / 50)  # 100 images/s
    series = totals.series()
    assert len(series) <= generate.RunTotals.MAX_POINTS
    assert sum(point["images"] for point in series) == 200_000
    assert len({point["shards"] for point in series[:-1]}) == 1
    assert generate._steady_rate(series) == pytest.approx(100, rel=0.01)


def huge_png(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` (its data is one tiny row)."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\0\0\0\0IEND\xaeB`\x82"


def files_under(folder: Path) -> dict[str, float]:
    return {str(p): p.lstat().st_mtime for p in folder.rglob("*")}


def test_hostile_inputs_become_rejects_and_nothing_leaves_the_given_folders(
    tmp_path, tiny_checkpoint, ray_session
):
    """A COCO dataset from a stranger: traversal and absolute names, Windows separators,
    links out of the folder and in loops, a name that is not UTF-8, zero-byte, truncated,
    text-as-image and huge-header files. Every valid image converted; every other item a
    reject naming its reason; nothing read or written outside the input and `--to`."""
    root, secret = tmp_path / "data" / "coco", tmp_path / "secret"
    write_image(secret / "evil.jpg", (40, 30), 7)  # would convert if it were ever read
    write_image(root / "val" / "good.jpg", (40, 30), 1)
    write_image(root / "images" / "val" / "sub" / "win.jpg", (33, 21), 2)
    write_image(root / "images" / "val" / "kept.jpg", (20, 20), 3)
    good = (root / "val" / "good.jpg").read_bytes()
    (root / "val" / "empty.jpg").write_bytes(b"")
    (root / "val" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (root / "val" / "text.jpg").write_text("not an image")
    (root / "val" / "huge.png").write_bytes(huge_png(60_000, 60_000))
    (root / "val" / "link-out.jpg").symlink_to(secret / "evil.jpg")
    (root / "val" / "loop.jpg").symlink_to(root / "val" / "loop.jpg")
    (root / "val" / os.fsdecode(b"caf\xff.jpg")).write_bytes(good)
    names = {
        "good.jpg": "converted",
        "sub\\win.jpg": "converted",  # Windows separators, found under images/val/
        "images/../images/val/kept.jpg": "converted",  # inside, however spelled
        "../../../secret/evil.jpg": "path outside the input folder",
        str(secret / "evil.jpg"): "path outside the input folder",
        "..\\..\\..\\secret\\evil.jpg": "path outside the input folder",
        "../../../../../../../../etc/hostname": "path outside the input folder",
        "link-out.jpg": "path outside the input folder",
        "loop.jpg": "image named in COCO json not found",
        "empty.jpg": "empty file",
        "cut.jpg": "truncated",
        "text.jpg": "not an image",
        "huge.png": "image too large",
        "caf\udcff.jpg": "file name is not valid UTF-8",
    }
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)], "annotations": []}
    coco["images"] += [{"id": 98}, {"id": 99, "file_name": 5}]  # no usable file_name
    coco["annotations"] = [{"id": i, "image_id": i, "bbox": [1, 1, 2, 2]} for i in range(3)]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco, ensure_ascii=True))
    before_secret, before_input = files_under(secret), files_under(root)

    out, to = tmp_path / "out", tmp_path / "exp" / "x"
    result = generate.run(generate_cfg(root, out, tiny_checkpoint), progress=False)
    assert result.generated == 3 and result.total == 3
    reasons = [r["reason"] for r in result.rejects]
    for name, expected in names.items():
        if expected != "converted":
            assert any(r.startswith(expected) for r in reasons), name
    assert sum("outside the input folder" in r for r in reasons) == 5
    assert sum("without a file_name" in r for r in reasons) == 2
    assert all(json.dumps(r, ensure_ascii=False).encode("utf-8") for r in result.rejects)
    assert export.run(out, to, progress=False).images == 3
    written = sorted(p.relative_to(to).as_posix() for p in to.rglob("*") if p.is_file())
    assert written == [
        "annotations/instances_val.json", "images/val/kept.png", "images/val/sub/win.png",
        "val/good.png",
    ]  # fmt: skip
    exported = json.loads((to / "annotations" / "instances_val.json").read_text())
    assert sorted(e["id"] for e in exported["images"]) == [0, 1, 2]
    assert len(exported["annotations"]) == 3
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["x"]
    assert files_under(secret) == before_secret and files_under(root) == before_input
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "exp", "out", "secret"]


def test_yolo_binary_and_outside_label_files_are_rejects(tmp_path, tiny_checkpoint, ray_session):
    root = tmp_path / "yolo"
    for name in ("ok", "binary", "linked"):
        write_image(root / "images" / f"{name}.png", (30, 20), 0)
    (root / "labels").mkdir()
    (root / "labels" / "ok.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "labels" / "binary.txt").write_bytes(b"\x00\xff\xfe\x80 junk")
    (tmp_path / "secret.txt").write_text("password\n")
    (root / "labels" / "linked.txt").symlink_to(tmp_path / "secret.txt")
    out = tmp_path / "out"
    result = generate.run(generate_cfg(root, out, tiny_checkpoint), progress=False)
    reasons = {Path(r["path"]).name: r["reason"] for r in result.rejects}
    assert result.generated == 1
    assert reasons["binary.txt"] == "label file is not UTF-8 text"
    assert reasons["linked.txt"] == "label file: path outside the input folder"
    to = tmp_path / "to"
    export.run(out, to, progress=False)
    assert (to / "labels" / "ok.txt").read_text() == "0 0.5 0.5 0.1 0.1\n"
    assert not any("password" in p.read_text() for p in (to / "labels").iterdir())


def test_export_writes_only_inside_to_whatever_the_shards_say(
    tmp_path, tiny_checkpoint, ray_session
):
    make_yolo(tmp_path / "yolo")
    out = tmp_path / "out"
    generate.run(generate_cfg(tmp_path / "yolo", out, tiny_checkpoint), progress=False)
    # Shards written by an older tirsynth, or edited by hand, with hostile paths in them.
    for shard in sorted(out.glob("tir-*.tar")):
        samples = [
            {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            for sample in shards.read_shard(shard)
        ]
        for sample in samples:
            record = json.loads(sample["json"])
            record["relpath"] = "../../escaped/" + record["relpath"]
            if "label_file" in record["labels"]:
                record["labels"]["label_file"] = "/tmp/../" + str(tmp_path / "escaped.txt")
            sample["json"] = json.dumps(record).encode()
        shards.write_shard(shard, samples)
    to = tmp_path / "deep" / "to"
    assert export.run(out, to, progress=False).images == len(SIZES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "out", "yolo"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["to"]
    assert (to / "escaped" / "images" / "train" / "img 0.png").is_file()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["index fragment", "rejects fragment", "deleted shard",
                                    "truncated shard"])  # fmt: skip
def test_damage_is_named_in_one_line_and_repaired_by_a_rerun(
    tmp_path, tiny_checkpoint, ray_session, damage
):
    from click.testing import CliRunner

    from tirsynth.cli import cli

    source = tmp_path / "in"
    for i in range(6):
        write_image(source / f"im{i}.png", (30, 20), i)
    (source / "notes.txt").write_text("a reject")
    out = tmp_path / "out"
    cfg = generate_cfg(source, out, tiny_checkpoint)
    first = generate.run(cfg, progress=False)
    shard = sorted(out.glob("tir-*.tar"))[1]
    untouched = {p.name: p.read_bytes() for p in out.glob("tir-*.tar") if p != shard}
    if damage == "index fragment":
        truncate(out / "index.parquet" / f"{shard.stem}.parquet")
    elif damage == "rejects fragment":
        truncate(next((out / "rejects.parquet").glob("*.parquet")))
    elif damage == "deleted shard":
        shard.unlink()
    else:
        truncate(shard)
    runner = CliRunner()
    info = runner.invoke(cli, ["info", str(out)])
    exported = runner.invoke(cli, ["export", str(out), "--to", str(tmp_path / "x")])
    if damage.endswith("shard"):
        assert info.exit_code == 0 and "damaged: 1 shards missing" in info.output
        assert shard.name in info.output
        assert exported.exit_code == 1 and not (tmp_path / "x").exists()
    else:
        assert info.exit_code == 1
        assert "damaged Parquet file" in info.output and "Traceback" not in info.output
    # Export reads the rejects too (the rejected frames of sequences are filled), and
    # refuses before it writes anything.
    assert exported.exit_code == 1 and "again" in exported.output
    assert len(exported.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    leftovers = [out / "grids" / ".sample.png.x1y2.tmp", out / "index.parquet" / ".f.tmp"]
    for leftover in leftovers:  # what a kill during the report or a commit leaves
        leftover.parent.mkdir(exist_ok=True)
        leftover.write_bytes(b"partial")
    again = generate.run(cfg, progress=False)
    assert not any(leftover.exists() for leftover in leftovers)
    assert again.total == first.total == 6 and len(again.rejects) == 1
    assert again.generated == (0 if damage == "rejects fragment" else 2)
    assert {p.name: p.read_bytes() for p in out.glob("tir-*.tar") if p.name in untouched} \
        == untouched  # fmt: skip
    assert runner.invoke(cli, ["export", str(out), "--to", str(tmp_path / "y")]).exit_code == 0
    assert len(list((tmp_path / "y").glob("*.png"))) == 6


def test_weights_that_do_not_fit_their_config_fail_before_anything_starts(
    tmp_path, tiny_checkpoint
):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["config"]["model"]["ngf"] *= 2
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    write_image(tmp_path / "in" / "a.png", (20, 10), 0)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="do not fit the model of its config") as caught:
        generate.run(generate_cfg(tmp_path / "in", out, wrong), progress=False)
    assert "\n" not in str(caught.value) and str(wrong) in str(caught.value)
    assert not out.exists()  # not claimed: the same --out works once the weights are right
    generate.check_generator_weights(load_checkpoint(tiny_checkpoint), tiny_checkpoint)


@pytest.mark.parametrize("canvas, tile", [(256, 128), (256, 64), (192, 64)])
def test_tiled_frames_agree_with_whole_frames(tiny_checkpoint, canvas, tile):
    """A frame too large for memory runs in overlapping tiles whose outputs are blended:
    they agree with the whole frame's (to a grey level almost everywhere: the tiny model's
    receptive field is a fraction of a tile), and no tile edge shows."""
    from conftest import SAMPLE

    generator, _ = inference.load_generator(tiny_checkpoint)
    image = Image.open(sorted((SAMPLE / "roadscene" / "crop_LR_visible").iterdir())[0])
    pixels, _ = inference.fit_to_square(image.convert("RGB"), canvas)
    whole = inference.translate_squares(generator, pixels[None]).astype(int)
    tiled = inference.translate_squares(generator, pixels[None], tile=tile).astype(int)
    difference = np.abs(whole - tiled)
    assert difference.mean() < 0.2 and np.percentile(difference, 99) <= 1
    assert difference.max() <= 4


def test_the_working_scale_comes_from_the_checkpoint_and_keeps_output_sizes(
    tmp_path, tiny_checkpoint, ray_session
):
    """A checkpoint trained at data.long_side L: generate scales each frame's long side to L
    (padded to a multiple of 2**depth), unless --long-side says otherwise; outputs keep the
    input's exact size."""
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["config"]["data"]["long_side"] = 72
    scaled = tmp_path / "scaled.pt"
    torch.save(state, scaled)
    for i, size in enumerate(SIZES):
        write_image(tmp_path / "in" / f"{i}.png", size, i)
    for long_side, expected in ((None, (80, 72)), (40, (48, 40))):
        out = tmp_path / f"out-{long_side}"
        cfg = generate_cfg(tmp_path / "in", out, scaled, long_side=long_side)
        result = generate.run(cfg, progress=False)
        manifest = json.loads((out / "manifest.json").read_text())
        assert (manifest["size"], manifest["long_side"]) == expected
        assert result.generated == len(SIZES)
        folder = tmp_path / f"files-{long_side}"
        export.run(out, folder, progress=False)
        for i, size in enumerate(SIZES):
            with Image.open(folder / f"{i}.png") as output:
                assert output.size == size
