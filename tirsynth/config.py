"""Typed, frozen config dataclasses and a strict YAML loader.

`load_config(path, cls, overrides)` reads YAML with `yaml.safe_load`, applies `--set a.b=v`
overrides and builds `cls`; an unknown key raises naming its dotted path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

Layout = Literal["auto", "roadscene", "llvip", "kaist", "folders", "csv", "video"]
DayNightMode = Literal["layout", "auto", "day", "night"]
ResizeSide = Literal["none", "rgb", "tir"]
VerifyMode = Literal["fast", "full"]


@dataclass(frozen=True)
class IngestConfig:
    """Options of `tirsynth ingest` (see `tirsynth ingest --help` for each one's meaning)."""

    sources: tuple[str, ...] = ()
    out: str = "data"
    layout: Layout = "auto"
    rgb_dir: str | None = None  # generic pairs: two folders matched by relative stem
    tir_dir: str | None = None
    dataset: str | None = None  # dataset name for generic pairs (default: folder name)
    meta: str | None = None  # CSV with a `stem` or `key` column merged into samples
    daynight: DayNightMode = "layout"
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test by key hash
    shard_size: int = 256  # pairs per shard
    resize: ResizeSide = "none"  # resize this side of a size-mismatched pair to the other's
    verify: VerifyMode = "fast"  # fast: header + end marker; full: decode every pixel
    max_pixels: int = 178_956_970  # decompression-bomb limit per image (Pillow's default x2)
    workers: int = 0  # processes; 0 = all cores (fewer for small jobs)
    overwrite: bool = False
    strict: bool = False
    frame_stride: int = 10  # paired video: every Nth frame (neighbours are near duplicates)

    def __post_init__(self) -> None:
        check_literals(self)
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {self.frame_stride}")
        if len(self.split) != 3 or any(p < 0 for p in self.split) or sum(self.split) <= 0:
            raise ValueError(f"split must be three non-negative fractions, got {self.split}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if (self.rgb_dir is None) != (self.tir_dir is None):
            raise ValueError("rgb_dir and tir_dir go together (generic folder pairs)")


SkipSet = Literal["sparse", "dense", "low", "high"]
NAMED_SKIPS = {"low": (1, 3), "high": (5, 7)}  # Table 2; sparse and dense follow the depth


@dataclass(frozen=True)
class ModelConfig:
    """Generator and discriminator (paper Sec. III; SPEC "The model")."""

    in_channels: int = 3
    out_channels: int = 1  # single-channel TIR; 3 reproduces the paper's parameter counts
    ngf: int = 64  # generator base channels
    ndf: int = 64  # discriminator base channels
    depth: int = 8  # encoder layers; the image side must be divisible by 2**depth
    skips: str | tuple[int, ...] = "sparse"  # sparse | dense | low | high | explicit levels
    dropout: float = 0.5  # in the three decoder layers after the innermost
    disc_layers: int = 3  # 3: the 70x70 PatchGAN
    disc_norm: Literal["batch", "spectral"] = "batch"  # spectral: SN convs, no BatchNorm
    # PatchGANs on the pair at full, 1/2, 1/4 ... resolution (pix2pixHD's multi-scale D):
    # the coarser ones judge whole objects, which one 70x70 window cannot see.
    disc_scales: int = 1
    # G's decoder: transposed convs (the paper) or resize + conv (no checkerboard artefacts)
    upsample: Literal["transpose", "resize"] = "transpose"
    input_skip: bool = False  # the input RGB joins a full-resolution output head (level 0)

    def __post_init__(self) -> None:
        check_literals(self)
        if isinstance(self.skips, str) and self.skips not in (*NAMED_SKIPS, "sparse", "dense"):
            raise ValueError(f"skips={self.skips!r} is not sparse, dense, low, high or a list")
        if self.disc_scales < 1:
            raise ValueError(f"model.disc_scales must be >= 1, got {self.disc_scales}")

    def resolved_skips(self) -> tuple[int, ...]:
        """Encoder levels with a skip: `dense` is every level 1..depth-1, `sparse` every odd
        one (the paper's {1,3,5,7} at depth 8; {1,3,5} for a 128 px model of depth 7)."""
        if self.skips == "dense":
            return tuple(range(1, self.depth))
        if self.skips == "sparse":
            return tuple(range(1, self.depth, 2))
        if isinstance(self.skips, str):
            return NAMED_SKIPS[self.skips]
        return tuple(self.skips)


AUGMENTS = ("color", "translation", "cutout")


@dataclass(frozen=True)
class LossConfig:
    """Generator objective weights (paper Eq. 7); 0 removes a term and its cost."""

    gan: float = 1.0
    l1: float = 100.0
    gradient: float = 100.0  # L1 between Sobel-magnitude maps of the intensities
    intensity: float = 30.0  # L1 between intensities I = 0.299R + 0.587G + 0.114B
    ssim: float = 0.0  # 1 - SSIM of the intensities (not in the paper; InfraGAN uses one)
    # The gradient loss compares Sobel magnitudes (the paper's GRA) or the derivatives.
    gradient_of: Literal["magnitude", "derivatives"] = "magnitude"
    # vanilla: non-saturating BCE; relativistic: the relativistic average GAN of ESRGAN,
    # whose D judges real against generated pairs rather than each alone
    gan_mode: Literal["vanilla", "lsgan", "relativistic"] = "vanilla"
    # L1 between D's activations on the real and on the generated pair, layer by layer
    # (pix2pixHD's feature matching, weight 10 there): D's view of texture, for G.
    feature_matching: float = 0.0
    # DiffAugment (Zhao et al. 2020) of every pair D sees, real and generated, and in G's
    # step: comma-separated of color, translation, cutout; '' for none. D then cannot
    # memorise a small training set's pairs.
    d_augment: str = ""
    # Gaussian sigma (pixels) of a blur applied to output and target before the L1 and
    # intensity terms: they then fix only the low frequencies, and leave the edges to the
    # GAN and the gradient term (pix2pix: L1 for the low, the PatchGAN for the high).
    low_pass: float = 0.0
    # Focal frequency loss (Jiang et al. 2021): the squared distance between the 2D spectra
    # of output and target, each frequency weighted by its own error. On this data the
    # largest errors are the low frequencies, so it acts mostly as an L2 regression.
    focal_frequency: float = 0.0

    def __post_init__(self) -> None:
        check_literals(self)
        unknown = set(filter(None, self.d_augment.split(","))) - set(AUGMENTS)
        if unknown:
            raise ValueError(f"loss.d_augment: {sorted(unknown)} not in {AUGMENTS}")
        weights = ("gan", "l1", "gradient", "intensity", "ssim", "feature_matching")
        for name in (*weights, "low_pass", "focal_frequency"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")


Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class DataConfig:
    """How training and validation read pair shards (`tirsynth.data.PairDataset`)."""

    image_size: int = 256  # side of the square crop the model sees; divisible by 2**depth
    load_size: int | None = None  # resize before the random crop; None: image_size * 286/256
    # The working scale: each frame is resized so that its long side has this many pixels,
    # for training (random image_size crops of it) and at inference (the whole frame).
    # None: the paper's geometry, whole frames squeezed into the image_size square.
    long_side: int | None = None
    augment: bool = True  # pix2pix: resize, random crop, horizontal flip
    loader_workers: int = 1  # DataLoader processes per training worker
    shuffle_buffer: int = 64
    val_split: str = "val"
    val_samples: int = 0  # 0: the whole val split each epoch

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be >= 1, got {self.image_size}")
        if self.long_side is not None and self.long_side < 1:
            raise ValueError(f"data.long_side must be >= 1, got {self.long_side}")

    @property
    def working_long_side(self) -> int:
        """The long side of a frame at the model's scale, in training and at inference."""
        return self.long_side or self.image_size


@dataclass(frozen=True)
class LoopConfig:
    """The training loop (paper Sec. IV: Adam 2e-4, betas (0.5, 0.999), batch 3, no decay)."""

    batch_size: int = 3  # per worker
    epochs: int = 10  # the paper's best SSIM came at 10 epochs
    max_steps: int = 0  # stop after this many steps (0: run all epochs)
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    precision: Precision = "fp32"  # autocast dtype; fp16 only on CUDA (with a grad scaler)
    channels_last: bool = True
    seed: int = 0
    # G's weights averaged with step k weighted by k**ema_power (a power-function EMA);
    # generate and evaluate use the average. None: off (the paper).
    ema_power: float | None = None
    # Steps up to this one are left out of the average (0: none); resuming a run past it
    # restarts the average there, e.g. where it switches to whole frames (docs/model.md).
    average_from: int = 0
    lr_decay_from: float = 1.0  # fraction of the run after which lr falls linearly to 0
    val_every: int = 1  # epochs between validations (each also writes latest.pt and a grid)
    checkpoint_every: int = 0  # also keep step_N.pt (and update latest.pt) every N steps
    keep_checkpoints: int = 0  # the newest step_N.pt files kept (0: all); each holds G, D and Adam
    log_every: int = 10  # steps between stats.jsonl records
    sample_count: int = 4  # rows of the per-epoch sample grid

    def __post_init__(self) -> None:
        check_literals(self)
        if min(self.batch_size, self.epochs, self.val_every) < 1 or self.max_steps < 0:
            raise ValueError("train.batch_size, epochs and val_every must be >= 1, max_steps >= 0")
        if min(self.checkpoint_every, self.keep_checkpoints) < 0:
            raise ValueError("train.checkpoint_every and keep_checkpoints must be >= 0")
        if self.ema_power is not None and self.ema_power < 0:
            raise ValueError(f"train.ema_power must be >= 0 or null, got {self.ema_power}")
        if not 0 <= self.lr_decay_from <= 1:
            raise ValueError(f"train.lr_decay_from must be in [0, 1], got {self.lr_decay_from}")


@dataclass(frozen=True)
class TrainConfig:
    """A model, its objective and how it is trained: one file in configs/."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        if self.data.image_size % 2**self.model.depth:
            raise ValueError(
                f"data.image_size={self.data.image_size} must be divisible by "
                f"2**model.depth={2**self.model.depth}"
            )


CorpusKind = Literal["auto", "folder", "coco", "yolo", "list", "shards", "video", "sequences"]
# The name that stands for the model shipped in the package wherever a checkpoint is given
# (--checkpoint, --compare, a pipeline stage), so a user can ask for it while ./runs holds
# trained ones.
BUILTIN_NAME = "builtin"
GeneratePrecision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class GenerateConfig:
    """Options of `tirsynth generate` (see `tirsynth generate --help`)."""

    input: str = ""  # folder, COCO or YOLO root, list file, or pair shards
    out: str = "generated"
    checkpoint: str | None = None  # None: the newest best.pt under ./runs
    input_kind: CorpusKind = "auto"
    split: str | None = None  # pair-shard input: only this split
    batch_size: int | None = None  # images per model call; None: 64 with a GPU, else 8
    cpu_batch: int = 32  # images per CPU task (decode and fit; map back, encode and score)
    concurrency: int = 0  # CPU tasks running at once per stage; 0: as many as Ray schedules
    workers: int = 0  # model replicas; 0: one per GPU, or 1 on the CPU
    precision: GeneratePrecision = "auto"  # auto: bf16 where the hardware has it, else fp32
    # A frame's long side at the model's scale; None: the checkpoint's working scale.
    long_side: int | None = None
    tile: int = 1024  # frames whose model-side square is larger run in overlapping tiles
    keep_rgb: bool = False  # also store the input RGB in each sample
    min_structure: float | None = None  # reject outputs scoring below this; None: no gate
    # Sequences: tau (grey levels) of a motion-adaptive filter across consecutive frames
    # (`temporal.steady_frames`), which keeps the texture still where the input is; None: off.
    temporal_filter: float | None = None
    shard_size: int = 256  # samples per output shard
    max_pixels: int = 178_956_970  # decompression-bomb limit per input image
    overwrite: bool = False  # replace a different generation in `out`
    retry_rejects: bool = False  # on resume, process the earlier rejects again
    address: str | None = None  # Ray cluster; None starts a local one
    verbose: bool = False  # Ray's own logs on stderr instead of OUT/ray.log

    def __post_init__(self) -> None:
        check_literals(self)
        sizes = (self.batch_size or 1, self.cpu_batch, self.shard_size)
        if min(sizes) < 1 or self.workers < 0 or self.concurrency < 0:
            raise ValueError(
                "batch_size, cpu_batch and shard_size must be >= 1, workers and concurrency >= 0"
            )
        if self.min_structure is not None and not -1 <= self.min_structure <= 1:
            raise ValueError(f"min_structure must be in [-1, 1], got {self.min_structure}")
        if self.temporal_filter is not None and self.temporal_filter <= 0:
            raise ValueError(f"temporal_filter must be > 0 grey levels, got {self.temporal_filter}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of `tirsynth evaluate` (see `tirsynth evaluate --help`)."""

    data: str = ""  # pair shards from `tirsynth ingest`
    out: str = "evaluation"
    checkpoint: str | None = None  # None: the newest best.pt under ./runs
    compare: tuple[str, ...] = ()  # more checkpoints, side by side
    names: tuple[str, ...] = ()  # display names of checkpoint + compare (default: run folder)
    split: str = "test"
    baselines: bool = True  # also score RGB luma as TIR, and its inverse
    precision: GeneratePrecision = "auto"
    long_side: int | None = None  # None: each checkpoint's working scale (data.long_side)
    tile: int = 1024  # frames whose model-side square is larger run in overlapping tiles
    batch_size: int = 8
    grid_rows: int = 4  # rows in each sample grid (random, worst, best)
    paper: bool = False  # put the paper's reported numbers beside ours

    def __post_init__(self) -> None:
        check_literals(self)
        if self.names and len(self.names) != 1 + len(self.compare):
            raise ValueError("names: one per checkpoint (--checkpoint, then each --compare)")


def load_config(path: str | Path | None, cls: type[T], overrides: list[str] = ()) -> T:
    """Build `cls` from a YAML file (or defaults when `path` is None) plus `key=value` overrides.

    Args:
        path: YAML file whose mapping mirrors `cls`'s fields, or None.
        cls: a config dataclass.
        overrides: strings `dotted.key=value`; values are parsed as YAML scalars.

    Returns:
        The config instance.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    return from_dict(cls, data)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Strictly convert a nested mapping to dataclass `cls`; unknown keys raise."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key {path + unknown[0]!r} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {name: coerce(hints[name], value, path + name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-YAML-safe dict of a config (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def config_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def dump_config(cfg: Any, path: Path) -> None:
    path.write_text(config_yaml(cfg))


def check_literals(cfg: Any) -> None:
    """Raise if a `Literal[...]` field holds a value outside its choices."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        choices = _literal_choices(hints[f.name])
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise ValueError(f"{f.name}={value!r} is not one of {', '.join(map(str, choices))}")


def coerce(hint: Any, value: Any, path: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(hint, value, path + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        errors = []
        for option in (a for a in get_args(hint) if a is not type(None)):
            try:
                return coerce(option, value, path)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        args = get_args(hint)
        item_type = args[0] if args else Any
        return tuple(coerce(item_type, v, path) for v in items)
    if origin is Literal:
        return value  # checked in __post_init__ with the field's name
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)):
        return str(value)
    if hint is Any:
        return value
    raise ValueError(f"{path}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _literal_choices(hint: Any) -> tuple[Any, ...]:
    if get_origin(hint) is Literal:
        return get_args(hint)
    if get_origin(hint) in (typing.Union, types.UnionType):
        for arg in get_args(hint):
            if get_origin(arg) is Literal:
                return get_args(arg) + (None,)
    return ()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
