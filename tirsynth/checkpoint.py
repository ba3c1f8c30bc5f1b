"""Training checkpoints: a dict of state_dicts, plain values and tensors, written atomically;
and generator weights alone as safetensors, for shipping (the built-in model).

Loading uses `torch.load(weights_only=True)`, which refuses arbitrary pickled objects, or
safetensors, which has no code to run at all; the model is rebuilt from the stored config
before its weights are loaded.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tirsynth import __version__
from tirsynth.config import BUILTIN_NAME, TrainConfig, from_dict
from tirsynth.models import build_generator
from tirsynth.shards import atomic_output

FORMAT = "tirsynth-checkpoint"
VERSION = 1
LATEST, BEST = "latest.pt", "best.pt"
WEIGHTS_SUFFIX = ".safetensors"
BUILTIN = Path(__file__).resolve().parent / "builtin" / "sparse_plus_half.safetensors"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write `state` (see `train.checkpoint_state`) to `path` via a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as handle:
        torch.save({"format": FORMAT, "version": VERSION, "tirsynth": __version__, **state}, handle)
    return path


def save_weights(state: dict[str, Any], path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write `weights_bytes(state, dtype)` to `path` atomically; `load_checkpoint` reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as handle:
        handle.write(weights_bytes(state, dtype))
    return path


def weights_bytes(state: dict[str, Any], dtype: torch.dtype = torch.float16) -> bytes:
    """A checkpoint's generator (its average, when training kept one) as safetensors.

    Only what inference needs: the weights (floating ones in `dtype`, which halves them at
    float16), the config to rebuild the model, and the real-TIR statistics that generation
    reports compare against. A training checkpoint is several times larger: it also holds
    the discriminator and both optimizers' moments.
    """
    from safetensors.torch import save

    stored: set[int] = set()

    def own(tensor: torch.Tensor) -> torch.Tensor:
        # safetensors refuses tensors that share memory, as a loaded checkpoint's do where
        # the saved ones did (two statistics that were one tensor, for instance).
        tensor = tensor.contiguous()
        if tensor.untyped_storage().data_ptr() in stored:
            tensor = tensor.clone()
        stored.add(tensor.untyped_storage().data_ptr())
        return tensor

    weights = state.get("generator_ema", state["generator"])
    tensors = {
        f"generator.{k}": own(v.to(dtype) if v.is_floating_point() else v)
        for k, v in weights.items()
    }
    stats = state["tir_stats"]
    for name, value in stats.items():
        if torch.is_tensor(value):
            tensors[f"tir_stats.{name}"] = own(value)
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "tirsynth": __version__,
        "config": json.dumps(state["config"]),
        "step": str(state.get("step", 0)),
        "epoch": str(state.get("epoch", 0)),
        "tir_stats_images": str(int(stats.get("images", 0))),
    }
    return save(tensors, metadata)


def _load_weights(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a loadable safetensors file ({err})") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not tirsynth weights")
    if int(metadata["version"]) > VERSION:
        raise ValueError(f"{path}: weights version {metadata['version']} is newer than this tool")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    weights = part("generator.")
    generator = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    return {
        "format": FORMAT,
        "version": int(metadata["version"]),
        "config": json.loads(metadata["config"]),
        "generator": generator,
        "tir_stats": {**part("tir_stats."), "images": int(metadata["tir_stats_images"])},
        "step": int(metadata["step"]),
        "epoch": int(metadata.get("epoch", 0)),
    }


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (or safetensors weights) on the CPU without executing pickled code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a tirsynth checkpoint, or it holds objects other than tensors and
            plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == WEIGHTS_SUFFIX:
        return _load_weights(path)
    try:
        # Mapped, not read: tensors are paged in when used, so a caller that needs only
        # the generator does not hold the optimizers' moments in memory.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a loadable tirsynth checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tirsynth checkpoint")
    if state["version"] > VERSION:
        raise ValueError(f"{path}: checkpoint version {state['version']} is newer than this tool")
    return state


def checkpoint_config(state: dict[str, Any]) -> TrainConfig:
    return from_dict(TrainConfig, state["config"])


def check_generator_weights(state: dict[str, Any], source: str | Path) -> None:
    """Raise a one-line ValueError when a checkpoint's generator weights do not fit the model
    its config describes (checked on the meta device: no memory, no compute), so that a
    mismatch is found on the driver before any worker starts."""
    with torch.device("meta"):
        expected = build_generator(checkpoint_config(state).model).state_dict()
    weights = state.get("generator_ema", state["generator"])
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k} {tuple(weights[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    problems = [
        *(f"missing {k}" for k in missing[:2]),
        *(f"unexpected {k}" for k in unexpected[:2]),
        *wrong[:2],
    ]
    if problems:
        count = len(missing) + len(unexpected) + len(wrong)
        raise ValueError(
            f"{source}: the generator weights do not fit the model of its config "
            f"({count} tensors differ: {'; '.join(problems)})"
        )


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


def checkpoint_path(ref: str | Path) -> Path:
    """The file a checkpoint reference names: BUILTIN for "builtin", else the path."""
    return BUILTIN if str(ref) == BUILTIN_NAME else Path(ref)


def find_best_checkpoint(root: str | Path = "runs") -> Path | None:
    """The most recently written `best.pt` under `root` (any depth), else None."""
    candidates = [p for p in Path(root).glob(f"**/{BEST}") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)
