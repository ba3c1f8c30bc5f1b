"""What a folder tirsynth wrote holds, for `tirsynth info`: pair shards (ingest), TIR shards
(generate), a training run, an evaluation or a pipeline's output; and, for any other
folder, a clear statement of what it is not. Reads only JSON and Parquet (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tirsynth import shards

KINDS = ("pair shards", "TIR shards", "training run", "evaluation", "pipeline output")


def describe(root: str | Path) -> dict[str, Any]:
    """{"kind": one of KINDS or "unknown", ...what that kind has to say}."""
    root = Path(root)
    manifest = shards.read_manifest(root) or {}
    report = _json(root / "report.json")
    if manifest.get("stage") == "generate":
        return {"kind": "TIR shards", **_generated(root, manifest)}
    if manifest.get("stage") == "ingest" or (root / shards.INDEX).exists():
        return {"kind": "pair shards", **shards.summarize(root)}
    if (root / "checkpoints").is_dir() or (root / "config.yaml").exists():
        return {"kind": "training run", **_training_run(root, report)}
    if report.get("stage") == "evaluate":
        return {"kind": "evaluation", **_evaluation(root, report)}
    if (root / "pipeline.json").exists():
        stages = _json(root / "pipeline.json")
        return {"kind": "pipeline output", "root": str(root), "stages": stages}
    return {
        "kind": "unknown",
        "root": str(root),
        "message": f"{root} is not a folder tirsynth wrote: no manifest.json, index.parquet, "
        "checkpoints/, evaluation report or pipeline.json (it is none of: "
        f"{', '.join(KINDS)})",
    }


def _generated(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    index = shards.read_arrow(root / shards.INDEX, ["shard", "shard_bytes", "sequence"])
    rejects = shards.read_rejects(root)
    has_sequences = "sequence" in index.column_names and index["sequence"].null_count < len(index)
    damaged = shards.damaged_shards(root, index)
    status = manifest.get("status", "unknown")
    return {
        "root": str(root),
        "status": f"damaged (was {status})" if damaged else status,
        "damaged_shards": damaged,
        "outputs": len(index),
        "shards": len({shard for (shard,) in shards.value_rows(index, ["shard"])}),
        "input": manifest.get("input"),
        "input_kind": manifest.get("input_kind"),
        "checkpoint": manifest.get("checkpoint"),
        "size": manifest.get("size"),
        "sequences": len(index["sequence"].drop_null().unique()) if has_sequences else 0,
        "rejects": len(rejects),
        "rejects_by_reason": dict(shards.rejects_by_reason(rejects)),
    }


def _training_run(root: Path, report: dict[str, Any]) -> dict[str, Any]:
    records = []
    if (root / "stats.jsonl").exists():
        lines = (root / "stats.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    vals = [r for r in records if r["kind"] == "val"]
    checkpoints = sorted(p.name for p in (root / "checkpoints").glob("*.pt"))
    return {
        "root": str(root),
        "status": "complete" if report else "unfinished (resume with --resume)",
        "step": report.get("step", records[-1]["step"] if records else 0),
        "best_val_ssim": max((r["ssim"] for r in vals), default=None),
        "checkpoints": checkpoints,
    }


def _evaluation(root: Path, report: dict[str, Any]) -> dict[str, Any]:
    results = report.get("results", {})
    return {
        "root": str(root),
        "split": report.get("split"),
        "samples": report.get("samples"),
        "ssim": {name: r["overall"].get("ssim") for name, r in results.items()},
    }


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
