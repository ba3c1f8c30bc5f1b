"""A pipeline file (pipelines/*.yaml) in; its stages run in order, each into OUT/<name>.

    out: runs/demo
    vars: {steps: 300}                     # defaults; `--var steps=50` overrides
    stages:
      - ingest: {name: data, sources: [...], split: [0.7, 0.15, 0.15]}
      - train: {name: sparse, config: configs/sparse.yaml, data: data,
                set: ["train.max_steps=${steps}"]}
      - generate: {name: generated, input: some/rgb/folder, checkpoint: sparse}
      - evaluate: {name: evaluation, data: data, checkpoint: sparse, split: test}
      - report: {}

A value naming an earlier stage stands for its output (a pair-shard folder, or a training
run's best checkpoint). A train stage with `from: <earlier train stage>` goes on from that
run's last checkpoint (weights, optimiser state and step) with its own settings: a second
phase, such as whole frames after crops (pipelines/builtin.yaml). A stage is skipped when
OUT/pipeline.json records it complete with the same fingerprint: its options, the content
of the files it reads and the fingerprints of the stages it depends on. A train stage that
did not finish resumes from its latest checkpoint. A pipeline never deletes a stage's
output: when a stage's fingerprint changes, it runs into a new folder (`OUT/<name>-2`,
...) and says what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from tirsynth import shards
from tirsynth.config import (
    BUILTIN_NAME,
    EvaluateConfig,
    GenerateConfig,
    IngestConfig,
    TrainConfig,
    from_dict,
    load_config,
)

STATE = "pipeline.json"
KINDS = ("ingest", "train", "generate", "evaluate", "report")
VARIABLE = re.compile(r"\$\{(\w+)\}")


def run(path: str | Path, variables: dict[str, Any] | None = None, progress: bool = True):
    """Run the pipeline file `path`; returns {stage name: its output path}."""
    spec = load_pipeline(path, variables or {})
    validate(spec)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads((out / STATE).read_text()) if (out / STATE).exists() else {}
    outputs: dict[str, Path] = {}
    fingerprints: dict[str, str] = {}
    for kind, options in spec["stages"]:
        name = options.pop("name", kind)
        inputs = _input_signatures(options, fingerprints)
        fingerprint = _digest([kind, options, inputs])
        record = state.get(name, {})
        target = out / record.get("folder", name)
        same = record.get("fingerprint") == fingerprint
        if same and record.get("status") == "complete" and target.exists():
            print(f"[{name}] up to date, skipped ({target})")
        else:
            if not same and target.exists() and any(target.iterdir()):
                # Never delete work: a stage whose inputs changed runs into a new folder.
                kept, target = target, _free_folder(out, name)
                print(f"[{name}] {_what_changed(record, options, inputs)}: running into "
                      f"{target}; {kept} is kept")  # fmt: skip
            resume = same and kind == "train"
            print(f"[{name}] running {kind} -> {target}")
            state[name] = {
                "kind": kind,
                "fingerprint": fingerprint,
                "status": "running",
                "folder": target.name,
                "options": options,
                "inputs": inputs,
            }
            shards.write_json(out / STATE, state)
            started = time.time()
            try:
                STAGES[kind](options, target, outputs, spec, resume, progress)
            except BaseException as error:  # a kill (KeyboardInterrupt) is a failure too
                state[name].update(status="failed", error=f"{type(error).__name__}: {error}")
                shards.write_json(out / STATE, state)
                raise
            state[name].update(status="complete", seconds=time.time() - started)
            shards.write_json(out / STATE, state)
        outputs[name], fingerprints[name] = target, fingerprint
        report = target / "report.html" if target.is_dir() else target
        if report.exists():
            print(f"[{name}] report: {report}")
    return outputs


def load_pipeline(path: str | Path, variables: dict[str, Any]) -> dict[str, Any]:
    """Read a pipeline file, substituting `${var}` from its `vars` and `variables`."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(raw) - {"out", "vars", "stages"})
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (known: out, vars, stages)")
    values = {**(raw.get("vars") or {}), **variables}
    missing = sorted(set(variables) - set(raw.get("vars") or {}))
    if missing:
        raise ValueError(f"{path}: --var {missing[0]} is not one of its vars")
    stages = []
    for item in raw.get("stages") or []:
        if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in KINDS:
            raise ValueError(f"{path}: each stage is one of {', '.join(KINDS)}: {item!r}")
        kind, options = next(iter(item.items()))
        stages.append((kind, _substitute(options or {}, values)))
    return {"out": _substitute(raw.get("out", "runs/pipeline"), values), "stages": stages}


def validate(spec: dict[str, Any]) -> None:
    """Check every stage's options before the first stage runs, so that a typo in the last
    stage does not cost the hours of the first ones.

    Raises:
        ValueError: naming the stage and what is wrong with its options.
    """
    placeholder = "/nonexistent/checked-later"
    trained: dict[str, TrainConfig] = {}  # earlier train stages, for `from`
    for number, (kind, options) in enumerate(spec["stages"], start=1):
        name = options.get("name", kind)
        options = {k: v for k, v in options.items() if k != "name"}
        try:
            if kind == "ingest":
                from_dict(IngestConfig, {**options, "out": placeholder})
            elif kind == "train":
                extra = set(options) - {"config", "set", "data", "workers", "from"}
                _no_more(dict.fromkeys(extra), "train")
                if "config" not in options or "data" not in options:
                    raise ValueError("train stage: needs config and data")
                cfg = load_config(options["config"], TrainConfig, list(options.get("set", [])))
                _check_start(options.get("from"), cfg, trained)
                trained[name] = cfg
            elif kind == "generate":
                from_dict(GenerateConfig, {**options, "out": placeholder})
            elif kind == "evaluate":
                from_dict(EvaluateConfig, {**options, "out": placeholder})
            elif options:
                _no_more(options, kind)
        except (ValueError, TypeError, KeyError, FileNotFoundError) as error:
            raise ValueError(f"stage {number} ({name}): {error}; no stage was run") from error


def _ingest(options, target, outputs, spec, resume, progress) -> None:
    from tirsynth import ingest

    cfg = from_dict(IngestConfig, {**options, "out": str(target)})
    result = ingest.run(cfg)
    if result.pairs == 0:
        raise ValueError(f"ingest stored no pairs from {cfg.sources}")


def _train(options, target, outputs, spec, resume, progress) -> None:
    from tirsynth import train

    options = dict(options)
    cfg = load_config(options.pop("config"), TrainConfig, list(options.pop("set", [])))
    data = _resolve(options.pop("data"), outputs)
    workers = options.pop("workers", 1)
    start = options.pop("from", None)
    _no_more(options, "train")
    resume = resume and (target / train.CHECKPOINTS).exists()
    if start is not None and not resume:
        last = train.CHECKPOINTS + "/" + train.LATEST
        _copy_checkpoint(outputs[start] / last, target / last)
        resume = True
    train.run(cfg, data, target, resume=resume, workers=workers, progress=progress)


def _check_start(start: str | None, cfg: TrainConfig, trained: dict[str, TrainConfig]) -> None:
    """A `from` names an earlier train stage of the same model (a later phase may change
    the data, loss and loop settings, not the network)."""
    if start is None:
        return
    if start not in trained:
        raise ValueError(f"train stage: from {start!r} is not an earlier train stage")
    if trained[start].model != cfg.model:
        raise ValueError(f"train stage: from {start!r}, whose model differs from this stage's")


def _copy_checkpoint(last: Path, destination: Path) -> None:
    """Begin a run as a copy of another's last checkpoint, which `train.run` resumes."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting from {last} (its step, weights and optimiser state)")
    with shards.atomic_output(destination) as handle, open(last, "rb") as source:
        shutil.copyfileobj(source, handle)


def _generate(options, target, outputs, spec, resume, progress) -> None:
    from tirsynth import generate

    options = {**options, "out": str(target)}
    options["input"] = str(_resolve(options["input"], outputs))
    options["checkpoint"] = str(_checkpoint(options["checkpoint"], outputs))
    generate.run(from_dict(GenerateConfig, options), progress=progress)


def _evaluate(options, target, outputs, spec, resume, progress) -> None:
    from tirsynth import evaluate

    options = {**options, "out": str(target)}
    options["data"] = str(_resolve(options["data"], outputs))
    refs = [options["checkpoint"], *options.get("compare", [])]
    options.setdefault("names", [r if r in outputs else Path(r).stem for r in refs])
    options["checkpoint"] = str(_checkpoint(refs[0], outputs))
    options["compare"] = [str(_checkpoint(r, outputs)) for r in refs[1:]]
    evaluate.run(from_dict(EvaluateConfig, options), progress=progress)


def _report(options, target, outputs, spec, resume, progress) -> None:
    """An overview page linking every stage's own report."""
    from tirsynth.report import write_overview

    write_overview(target, outputs)


STAGES = {
    "ingest": _ingest,
    "train": _train,
    "generate": _generate,
    "evaluate": _evaluate,
    "report": _report,
}


def _checkpoint(ref: str, outputs: dict[str, Path]) -> Path:
    """A train stage's best checkpoint (its latest when it never validated), the built-in
    model for "builtin", or a path."""
    if ref == BUILTIN_NAME:
        from tirsynth.checkpoint import checkpoint_path  # torch: only when one is needed

        return checkpoint_path(ref)
    if ref in outputs:
        best = outputs[ref] / "checkpoints" / "best.pt"
        return best if best.exists() else outputs[ref] / "checkpoints" / "latest.pt"
    return Path(ref)


def _resolve(ref: str, outputs: dict[str, Path]) -> Path:
    return outputs.get(ref, Path(ref))


def _no_more(options: dict, kind: str) -> None:
    if options:
        raise ValueError(f"{kind} stage: unknown option {next(iter(options))!r}")


def _input_signatures(options: dict, fingerprints: dict[str, str]) -> dict[str, str]:
    """{value: signature} for each option value naming an earlier stage or an existing path."""
    signatures = {}
    for value in _strings(options):
        if value in fingerprints:
            signatures[value] = fingerprints[value]
        elif os.path.exists(value):
            signatures[value] = _signature(Path(value))
    return signatures


def _signature(path: Path) -> str:
    """What a stage reads, by content, never by modification time (a checkout, an editor or
    a copy touches files without changing them). A file: its bytes. A folder that tirsynth
    wrote: its index (one row per sample, with each image's sha256), not its shards. Any
    other folder: names and sizes."""
    if path.is_file():
        return shards.file_sha256(path)
    index = path / shards.INDEX
    if index.is_file():  # an older tirsynth's single-file index
        return shards.file_sha256(index)
    if index.is_dir():
        return _digest([(p.name, shards.file_sha256(p)) for p in shards.fragments(index)])
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return _digest([(str(p.relative_to(path)), p.stat().st_size) for p in files])


def _digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _what_changed(record: dict, options: dict, inputs: dict[str, str]) -> str:
    old_inputs = record.get("inputs", {})
    changed = [value for value, signature in inputs.items() if old_inputs.get(value) != signature]
    if record.get("options") not in (None, options):
        changed.insert(0, "its options")
    return f"{' and '.join(changed) or 'its inputs'} changed since the last run"


def _free_folder(out: Path, name: str) -> Path:
    number = 2
    while (out / f"{name}-{number}").exists():
        number += 1
    return out / f"{name}-{number}"


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _substitute(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        items = []
        for item in value:
            resolved = _substitute(item, variables)
            # "${list_var}" as a list item splices the list in, and so does a list (a YAML
            # alias of another stage's list, e.g. the settings two train phases share).
            is_splice = isinstance(item, list) or isinstance(item, str) and VARIABLE.fullmatch(item)
            items.extend(resolved if is_splice and isinstance(resolved, list) else [resolved])
        return items
    if not isinstance(value, str):
        return value
    whole = VARIABLE.fullmatch(value)
    if whole:
        return _lookup(whole.group(1), variables)
    return VARIABLE.sub(lambda m: str(_lookup(m.group(1), variables)), value)


def _lookup(name: str, variables: dict[str, Any]) -> Any:
    if name not in variables:
        raise ValueError(f"pipeline variable ${{{name}}} is not defined in vars")
    return variables[name]
