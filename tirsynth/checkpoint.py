"""Training checkpoints: a dict of state_dicts, plain values and tensors, written atomically.

Loading uses `torch.load(weights_only=True)`, which refuses arbitrary pickled objects, and
the model is rebuilt from the stored config before its weights are loaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tirsynth import __version__
from tirsynth.config import TrainConfig, from_dict
from tirsynth.models import build_generator
from tirsynth.shards import atomic_output

FORMAT = "tirsynth-checkpoint"
VERSION = 1
LATEST, BEST = "latest.pt", "best.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write `state` (see `train.checkpoint_state`) to `path` via a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as handle:
        torch.save({"format": FORMAT, "version": VERSION, "tirsynth": __version__, **state}, handle)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU without executing pickled code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a tirsynth checkpoint, or it holds objects other than tensors and
            plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a loadable tirsynth checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tirsynth checkpoint")
    if state["version"] > VERSION:
        raise ValueError(f"{path}: checkpoint version {state['version']} is newer than this tool")
    return state


def checkpoint_config(state: dict[str, Any]) -> TrainConfig:
    return from_dict(TrainConfig, state["config"])


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The trained generator of a checkpoint, in eval mode on `device`, and the checkpoint:
    its averaged weights when training kept an average (`train.ema_power`).

    Returns:
        (generator, state) where state holds "config", "tir_stats", "step", "val", ...
    """
    state = load_checkpoint(path)
    generator = build_generator(checkpoint_config(state).model)
    generator.load_state_dict(state.get("generator_ema", state["generator"]))
    return generator.to(device).eval(), state


def find_best_checkpoint(root: str | Path = "runs") -> Path | None:
    """The most recently written `best.pt` under `root` (any depth), else None."""
    candidates = [p for p in Path(root).glob(f"**/{BEST}") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)
