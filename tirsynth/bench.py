"""Benchmarks that print their figures and the ratio to the relevant limit, measured in one run."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from tirsynth import ingest, layouts
from tirsynth.config import IngestConfig, TrainConfig

TRIALS = 5


def bench_ingest(
    sources: list[str],
    meta: str | None,
    repeat: int = 1,
    workers: int = 0,
    scratch_root: str | None = None,
) -> Iterator[str]:
    """Ingest pairs/s against the floor (reading and hashing the same files once, one core).

    Each figure is the best of TRIALS runs with a warm page cache, floor and ingest
    alternating so that drift on a shared machine hits both alike. Outputs go to a
    temporary folder under `scratch_root` (default: the system's temporary folder).
    """
    if scratch_root is not None:
        Path(scratch_root).mkdir(parents=True, exist_ok=True)
    yield (
        f"{'input':<10}{'pairs':>7}{'floor s':>11}{'ingest s':>11}{'pairs/s':>10}{'ratio':>8}"
        f"{'peak MiB':>10}"
    )
    peaks: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="tirsynth-bench-", dir=scratch_root) as scratch:
        corpora = [("x1", sources, meta)]
        if repeat > 1:
            corpora.append(
                (
                    f"x{repeat}",
                    *_repeat_corpus(sources, meta, repeat, Path(scratch) / "corpus"),
                )
            )
        for name, corpus_sources, corpus_meta in corpora:
            files = _source_files(corpus_sources)
            floors, runs = [], []
            for trial in range(TRIALS):
                # Each timing starts with nothing left to write back from the last one;
                # outputs are deleted with the scratch folder at the end.
                os.sync()
                floors.append(_time(lambda files=files: _read_and_hash(files)))
                out = Path(scratch) / f"out-{name}-{trial}"
                cfg = IngestConfig(
                    sources=tuple(corpus_sources), meta=corpus_meta, out=str(out), workers=workers
                )
                os.sync()
                runs.append(_time(lambda cfg=cfg: ingest.run(cfg)))
                pairs = len(ingest.shards.read_index(out))
            # Memory in a run of its own: the sampling thread would slow a timed one.
            cfg = replace(cfg, out=str(Path(scratch) / f"out-{name}-memory"))
            with _PeakMemory(interval=0.02) as memory:
                ingest.run(cfg)
            peaks[name] = memory.peak
            floor, best = min(floors), min(runs)
            yield (
                f"{name:<10}{pairs:>7}{floor:>11.4g}{best:>11.4g}{pairs / best:>10.1f}"
                f"{floor / best:>8.2f}{peaks[name] / 2**20:>10.0f}"
            )
    if repeat > 1:
        yield f"input x{repeat} = the input copied {repeat} times under other names"
        small, large = peaks.values()
        yield f"peak memory ratio x{repeat} / x1: {large / small:.2f} (limit 1.25)"
    yield (
        "peak = largest PSS of this process and its ingest workers, sampled every 20 ms "
        "during one more untimed ingest"
    )
    yield (
        f"ratio = floor / ingest time (1.0 = as fast as reading and hashing once); "
        f"{os.cpu_count()} cores"
    )


def _source_files(sources: list[str]) -> list[str]:
    files = []
    for source in sources:
        pairs, _, _ = layouts.discover(source)
        files += [path for pair in pairs for path in (pair.rgb, pair.tir)]
    return files


def _read_and_hash(files: list[str]) -> None:
    for path in files:
        with open(path, "rb") as handle:
            hashlib.sha256(handle.read()).hexdigest()


def _repeat_corpus(
    sources: list[str], meta: str | None, repeat: int, scratch: Path
) -> tuple[list[str], str | None]:
    """Copy each source `repeat` times over, every file under a new stem `{stem}_r{i}`."""
    copies = []
    for source in sources:
        root = Path(source)
        target = scratch / root.name
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            folder = target / path.parent.relative_to(root)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(repeat):
                shutil.copyfile(path, folder / f"{path.stem}_r{i}{path.suffix}")
        copies.append(str(target))
    if meta is None:
        return copies, None
    with open(meta, newline="") as handle:
        rows = list(csv.DictReader(handle))
    meta_copy = scratch / Path(meta).name
    with open(meta_copy, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            for i in range(repeat):
                writer.writerow({**row, "stem": f"{row['stem']}_r{i}"})
    return copies, str(meta_copy)


def _time(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def bench_train(
    cfg: TrainConfig, precisions: list[str], steps: int = 3, rounds: int = 2
) -> Iterator[str]:
    """Seconds per training step (D step + G step) of the sparse and the dense generator.

    Both models use `cfg` except for the skip set, on a synthetic batch of
    `train.batch_size` images of `data.image_size`. Each figure is the best mean over
    `rounds` rounds of `steps` steps; the rounds alternate between the models so that drift
    on a shared machine hits both alike.
    """
    import torch

    from tirsynth.models import build_discriminator, build_generator, count_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, batch_size = cfg.data.image_size, cfg.train.batch_size
    threads = torch.get_num_threads()
    yield f"device {device} ({threads} threads), image {size}x{size}, batch {batch_size}"
    variants = {name: replace(cfg.model, skips=name) for name in ("sparse", "dense")}
    for name, model_cfg in variants.items():
        rgb = torch.zeros(1, model_cfg.in_channels, size, size)
        tir = torch.zeros(1, model_cfg.out_channels, size, size)
        gen_gflops = count_flops(build_generator(model_cfg).eval(), rgb) / 1e9
        disc_gflops = count_flops(build_discriminator(model_cfg).eval(), rgb, tir) / 1e9
        yield f"{name:<7} forward GFLOPs per image: G {gen_gflops:.2f}, D {disc_gflops:.2f}"
    yield f"{'precision':<10}{'sparse s/it':>13}{'dense s/it':>12}{'sparse/dense':>14}"
    best: dict[tuple[str, str], float] = {}
    for precision in precisions:
        for _ in range(rounds):
            for name, model_cfg in variants.items():
                seconds = _seconds_per_train_step(
                    replace(cfg, model=model_cfg), precision, device, steps
                )
                best[precision, name] = min(best.get((precision, name), math.inf), seconds)
        sparse, dense = best[precision, "sparse"], best[precision, "dense"]
        # Four significant digits: tiny test models take milliseconds per step.
        yield f"{precision:<10}{sparse:>13.4g}{dense:>12.4g}{sparse / dense:>14.3f}"
    for precision in precisions:
        if precision != "fp32" and "fp32" in precisions:
            speedup = best["fp32", "sparse"] / best[precision, "sparse"]
            yield f"{precision} vs fp32, sparse: {speedup:.2f}x faster"


def _seconds_per_train_step(cfg: TrainConfig, precision: str, device, steps: int) -> float:
    import torch

    from tirsynth import train
    from tirsynth.models import build_discriminator, build_generator

    size, batch_size = cfg.data.image_size, cfg.train.batch_size
    batch = {
        "rgb": torch.rand(batch_size, cfg.model.in_channels, size, size) * 2 - 1,
        "tir": torch.rand(batch_size, cfg.model.out_channels, size, size) * 2 - 1,
    }
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    gen = build_generator(cfg.model).to(device, memory_format=memory_format)
    disc = build_discriminator(cfg.model).to(device, memory_format=memory_format)
    betas = (cfg.train.beta1, cfg.train.beta2)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.train.lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.train.lr, betas=betas)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = train.autocast_context(device, precision)
    timings = []
    for _ in range(steps + 1):  # the first step warms up allocations and kernel choice
        _sync(device)
        start = time.perf_counter()
        train.train_step(
            batch, gen, disc, opt_g, opt_d, cfg.loss, autocast, scaler, device, memory_format
        )
        _sync(device)
        timings.append(time.perf_counter() - start)
    return sum(timings[1:]) / steps


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_generate(
    source: str,
    checkpoint: str | None,
    batch_size: int,
    precision: str,
    limit: int = 0,
    shard_size: int = 16,
    long_side: int | None = None,
    cpu_batch: int | None = None,
) -> Iterator[str]:
    """End-to-end generation images/s against the bare generator forward pass.

    Both at the same batch size, resolution and precision, in this run; the CPU tasks take
    `cpu_batch` images each (default: `generate`'s, what a user's run gets); generate twice in
    one Ray, cold and warm (see below). Without a checkpoint, a randomly initialised
    configs/sparse.yaml generator stands in (speed does not depend on the weights). Peak
    memory is the largest proportional set size (PSS) of this process and all its
    descendants (Ray's workers included) sampled during the run.
    """
    import torch

    from tirsynth import cluster, generate, inference
    from tirsynth.checkpoint import checkpoint_config, load_checkpoint
    from tirsynth.config import GenerateConfig

    with tempfile.TemporaryDirectory(prefix="tirsynth-bench-") as scratch:
        scratch = Path(scratch)
        checkpoint = Path(checkpoint) if checkpoint else _random_checkpoint(scratch)
        source_dir = _image_subset(Path(source), limit, scratch / "input")
        count = sum(1 for _ in source_dir.rglob("*") if _.is_file())
        train_cfg = checkpoint_config(load_checkpoint(checkpoint))
        geometry = generate.model_geometry(GenerateConfig(long_side=long_side), train_cfg)
        size = geometry[0]
        translator = inference.Translator(str(checkpoint), precision)
        yield (
            f"checkpoint {checkpoint.name}, {count} images, frames at long side {geometry[1]} "
            f"in a model-side square of {size}, batch "
            f"{batch_size}, {cpu_batch or GenerateConfig().cpu_batch} images per CPU task, "
            f"precision {translator.precision}, {torch.get_num_threads()} threads"
        )
        bare = _bare_images_per_s(translator, batch_size, size)
        yield f"bare generator forward: {bare:.2f} images/s"
        cfg = GenerateConfig(
            input=str(source_dir),
            checkpoint=str(checkpoint),
            batch_size=batch_size,
            cpu_batch=cpu_batch or GenerateConfig().cpu_batch,
            shard_size=shard_size,
            precision=precision,
            long_side=long_side,
        )
        # Two runs in one Ray: the first pays for starting its worker processes (and is
        # what a user's single run costs), the second finds them started.
        with cluster.ray_session(None, scratch / cluster.LOG_NAME), _PeakMemory() as memory:
            for run in ("cold", "warm"):
                result = generate.run(replace(cfg, out=str(scratch / run)), progress=False)
                rate = result.report["images_per_s"]
                yield (
                    f"end-to-end generate, {run} (worker processes "
                    f"{'started in this run' if run == 'cold' else 'already running'}): "
                    f"{rate:.2f} images/s over {result.generated} images "
                    f"({result.report['pipeline_seconds']:.1f} s); ratio to bare forward "
                    f"{rate / bare:.2f}; the model busy {result.report['model_share']:.2f} "
                    "of the pipeline's time"
                )
        yield f"peak memory (PSS, driver + Ray workers): {memory.peak / 2**30:.2f} GiB"
        if translator.precision != "fp32":
            low, mean = precision_agreement(checkpoint, source_dir, translator.precision, size)
            yield (
                f"{translator.precision} vs fp32 outputs on these images: SSIM mean {mean:.4f}, "
                f"min {low:.4f}"
            )


def bench_generate_scale(
    images: int = 2000,
    factor: int = 10,
    shard_size: int = 2,
    batch_size: int = 8,
    cpu_batch: int = 32,
) -> Iterator[str]:
    """Generate over the same kind of corpus at 1x and `factor`x: per-image time and the
    driver's peak RSS of each, and their ratios (flat is the aim: cost linear in the
    corpus, driver memory bounded). A tiny random model and 32x24 images, so that the
    pipeline, not the model, is measured; small shards, so that per-shard costs show.
    Each size runs in its own process (the driver's peak RSS is its own). Its limit: the
    same stages called one after another in one process on one core, times the cores.
    Also the issue's first floor, decoding each input and encoding an output of its size,
    which leaves out scoring, most of the work on small images.
    With `factor` 1, one size only.
    """
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="tirsynth-bench-scale-") as scratch:
        scratch = Path(scratch)
        checkpoint = _random_checkpoint(scratch, "tiny.yaml")
        results = {}
        for count in (images, images * factor) if factor > 1 else (images,):
            source = _small_image_corpus(scratch / f"in-{count}", count)
            floor = _decode_encode_images_per_s(source, min(count, 2000))
            done, done_seconds = _same_work_in_one_process(
                source, checkpoint, scratch / "same-work", min(count, 2000), shard_size,
                cpu_batch,
            )  # fmt: skip
            one_core = done / done_seconds
            out = scratch / f"out-{count}"
            command = [
                sys.executable, "-m", "tirsynth.cli", "generate", "--input", str(source),
                "--out", str(out), "--checkpoint", str(checkpoint), "--batch-size",
                str(batch_size), "--cpu-batch", str(cpu_batch), "--shard-size",
                str(shard_size), "--precision", "fp32",
            ]  # fmt: skip
            finished = subprocess.run(command, capture_output=True, text=True)
            if finished.returncode:
                raise RuntimeError(f"generate failed:\n{finished.stderr[-3000:]}")
            report = json.loads((out / "report.json").read_text())
            seconds, rss = report["pipeline_seconds"], report["driver_peak_rss_bytes"]
            results[count] = (seconds / report["generated_this_run"], rss)
            outputs = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            rate = report["generated_this_run"] / seconds
            cores = os.cpu_count() or 1
            yield (
                f"{count} images: {rate:.0f} images/s ({1000 * seconds / count:.2f} ms per "
                f"image, {seconds:.1f} s after Ray started), driver peak RSS "
                f"{rss / 2**20:.0f} MiB, output {outputs / 2**20:.1f} MiB; the same stages "
                f"in one process on one core {one_core:.0f} images/s, ratio to {cores} "
                f"cores of it {rate / (cores * one_core):.2f}; floor (decode + encode only) "
                f"{floor:.0f} images/s, ratio {rate / floor:.2f}"
            )
            shutil.rmtree(out)
            shutil.rmtree(source)
        if factor > 1:
            (small_time, small_rss), (large_time, large_rss) = results.values()
            yield (
                f"{factor}x corpus: per-image time ratio {large_time / small_time:.2f} (limit "
                f"1.15), driver peak RSS ratio {large_rss / small_rss:.2f} (limit 1.25)"
            )
        yield (
            f"shards of {shard_size}, {cpu_batch} images per CPU task, {batch_size} per model "
            f"call; {os.cpu_count()} cores"
        )


def _same_work_in_one_process(
    source: Path, checkpoint: Path, scratch: Path, limit: int, shard_size: int, cpu_batch: int
) -> tuple[int, float]:
    """(images, seconds) of generate's own stages, given what the pipeline gives them,
    called one after another in this process on one thread (as a Ray task runs), over
    whole CPU batches of at least `limit` images: all the per-image work of the pipeline
    without Ray. The model sees a CPU batch at a time."""
    import numpy as np
    import pyarrow as pa
    import torch

    from tirsynth import generate, inference
    from tirsynth.checkpoint import checkpoint_config, load_checkpoint
    from tirsynth.config import GenerateConfig
    from tirsynth.corpus import discover_corpus, write_listing

    cfg = GenerateConfig(
        input=str(source), out=str(scratch / "out"), checkpoint=str(checkpoint),
        cpu_batch=cpu_batch, shard_size=shard_size, precision="fp32",
    )  # fmt: skip
    state = load_checkpoint(checkpoint)
    corpus = discover_corpus(cfg.input)
    done = pa.array([], pa.string())
    listing = write_listing(corpus, scratch / "listing", done, cpu_batch)
    geometry = generate.model_geometry(cfg, checkpoint_config(state))
    stages = generate.stage_options(cfg, corpus, listing, geometry, state["tir_stats"])
    Path(cfg.out).mkdir(parents=True)
    threads = torch.get_num_threads()
    try:
        translator = inference.Translator(cfg.checkpoint, threads=1, **stages.translate)
        images = 0
        start = time.perf_counter()
        for group in range(min(listing.groups, math.ceil(limit / cpu_batch))):
            batch = generate.preprocess_group({"id": np.array([group])}, **stages.preprocess)
            batch = generate.postprocess_batch(translator(batch), **stages.postprocess)
            for first in range(0, len(batch["key"]), shard_size):
                shard = {name: column[first : first + shard_size] for name, column in batch.items()}
                images += int(generate.write_shard_batch(shard, **stages.write)["images"][0])
        return images, time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)  # this process's later measurements use them all
        shutil.rmtree(scratch)


def _decode_encode_images_per_s(source: Path, limit: int) -> float:
    """Images/s of reading, decoding and encoding an output of the same size as PNG (the
    work generate cannot skip, without the model), in this process."""
    import numpy as np

    from tirsynth import inference

    files = sorted(source.iterdir())[:limit]
    start = time.perf_counter()
    for path in files:
        image = inference.decode_rgb(path.read_bytes(), 10**9)
        inference.encode_png(np.asarray(image.convert("L")))
    return len(files) / (time.perf_counter() - start)


def _small_image_corpus(folder: Path, count: int, distinct: int = 64) -> Path:
    """`count` 32x24 PNGs of noise: `distinct` files, the rest hard links to them."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    originals = []
    for i in range(min(distinct, count)):
        path = folder / f"img{i:07d}.png"
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), np.uint8)).save(path)
        originals.append(path)
    for i in range(len(originals), count):
        os.link(originals[i % len(originals)], folder / f"img{i:07d}.png")
    return folder


def precision_agreement(
    checkpoint: Path, source: Path, precision: str, size: int, limit: int = 32
) -> tuple[float, float]:
    """(min, mean) SSIM between outputs at `precision` and at fp32 on up to `limit` images."""
    import numpy as np
    import torch

    from tirsynth import generate, inference, metrics

    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in layouts.IMAGE_SUFFIXES)
    files = files[:limit]
    batch = generate.preprocess_batch(
        {
            "key": np.array([p.name for p in files], dtype=object),
            "path": np.array([str(p) for p in files], dtype=object),
            "shard": np.array([""] * len(files), dtype=object),
        },
        size,
        str(source),
        10**9,
        False,
    )
    outputs = {}
    for name in ("fp32", precision):
        translated = inference.Translator(str(checkpoint), name)(batch)["tir"]
        outputs[name] = torch.from_numpy(np.array(translated)).double()
    scores = metrics.ssim(outputs["fp32"], outputs[precision])
    return scores.min().item(), scores.mean().item()


def _bare_images_per_s(translator, batch_size: int, size: int, seconds: float = 5.0) -> float:
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), np.uint8)
    batch = {"pixels": pixels}
    translator(batch)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        translator(batch)
        done += batch_size
    return done / (time.perf_counter() - start)


def _random_checkpoint(folder: Path, config: str = "sparse.yaml") -> Path:
    import torch

    from tirsynth.checkpoint import save_checkpoint
    from tirsynth.config import TrainConfig, load_config, to_dict
    from tirsynth.models import build_generator

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / config, TrainConfig)
    flat = torch.full((256,), 1 / 256, dtype=torch.float64)
    state = {
        "config": to_dict(cfg),
        "generator": build_generator(cfg.model).state_dict(),
        "tir_stats": {"intensity_hist": flat, "lbp_hist": flat, "images": 0},
    }
    return save_checkpoint(folder / f"random-{Path(config).stem}.pt", state)


def _image_subset(source: Path, limit: int, folder: Path) -> Path:
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in layouts.IMAGE_SUFFIXES)
    if not limit or limit >= len(files):
        return source
    folder.mkdir(parents=True)
    for path in files[:limit]:
        # A hard link or a copy: a symbolic link out of the input folder is a reject.
        try:
            os.link(path, folder / path.name)
        except OSError:
            shutil.copyfile(path, folder / path.name)
    return folder


class _PeakMemory:
    """Samples the PSS of this process tree every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval

    def __enter__(self):
        import threading

        self.peak, self._stop = _tree_pss(os.getpid()), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _tree_pss(os.getpid()))


def _tree_pss(root: int) -> int:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
