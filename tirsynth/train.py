"""GAN training: pair shards in; checkpoints, stats.jsonl, sample grids and config.yaml out.

One worker trains in this process without Ray. `workers > 1` runs the same loop in N Ray
Train workers under DDP (gloo on CPU, NCCL on GPU). G and D are wrapped separately. D runs
on real and on fake pairs in separate forwards, as pix2pix, so that its BatchNorm sees the
same kind of batch in its own step as in G's; BatchNorm buffers are not re-synced before
each forward (`broadcast_buffers=False`), which is what lets two forwards precede one
backward under DDP (pytorch/pytorch#175024). D's running statistics are never used (D only
trains), so letting them differ between ranks costs nothing; G's, which inference uses, are
averaged over the ranks before each checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from tirsynth import __version__, cluster, shards
from tirsynth.checkpoint import BEST, LATEST, load_checkpoint, save_checkpoint
from tirsynth.config import LoopConfig, LossConfig, TrainConfig, config_yaml, from_dict, to_dict
from tirsynth.data import PairDataset, carve_val_keys
from tirsynth.inference import canvas_side, iter_pairs
from tirsynth.losses import augment_pairs, discriminator_loss, generator_loss
from tirsynth.models import build_discriminator, build_generator
from tirsynth.quality import real_tir_statistics, validate, write_sample_grid
from tirsynth.report import write_report_or_warn
from tirsynth.shards import atomic_output, remove_temporaries, write_json

CHECKPOINTS = "checkpoints"
STATS = "stats.jsonl"
DIVERGED = "diverged.txt"  # how Ray Train workers tell the driver that the losses blew up
RAY_MAX_FAILURES = 2  # worker-group restarts, each resuming from the latest checkpoint


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainResult:
    out: Path
    step: int
    epoch: int
    checkpoint: Path  # latest
    best_checkpoint: Path | None
    val: dict[str, Any]  # the last validation's metrics (empty without a val split)


def run(
    cfg: TrainConfig,
    data: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    workers: int = 1,
    address: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `cfg` on the pair shards in `data`, writing the run to `out`.

    Args:
        cfg: model, loss, data and loop settings.
        data: a folder written by `tirsynth ingest` (train split, and val for validation).
        out: the run folder: config.yaml, stats.jsonl, checkpoints/, samples/.
        resume: continue from `out/checkpoints/latest.pt` at its exact step.
        workers: data-parallel workers; more than 1 goes through Ray Train.
        address: a Ray cluster to join (with workers > 1); None starts a local one.
        progress: show a progress bar.

    Returns:
        Where the run stopped and its checkpoints.
    """
    data, out = Path(data).resolve(), Path(out).resolve()
    prepare_run_dir(cfg, out, resume)
    started = time.time()
    if workers > 1:
        _run_ray_train(cfg, data, out, resume, workers, address, progress)
    else:
        train_worker(cfg, data, out, resume=resume, progress=progress)
    state = load_checkpoint(out / CHECKPOINTS / LATEST)
    best = out / CHECKPOINTS / BEST
    write_json(
        out / "report.json",
        {
            "stage": "train",
            "command": shlex.join(sys.argv),
            "tirsynth": __version__,
            "torch": str(torch.__version__),
            "data": str(data),
            "config": to_dict(cfg),
            "workers": workers,
            "step": state["step"],
            "epoch": state["epoch"],
            "seconds": time.time() - started,
            "checkpoint": str(out / CHECKPOINTS / LATEST),
            "best_checkpoint": str(best) if best.exists() else None,
            "best_ssim": state["best_ssim"],
            "val": state["val"],
        },
    )
    write_report_or_warn(out)
    return TrainResult(
        out,
        state["step"],
        state["epoch"],
        out / CHECKPOINTS / LATEST,
        best if best.exists() else None,
        state["val"],
    )


def prepare_run_dir(cfg: TrainConfig, out: Path, resume: bool) -> None:
    """Check that `out` is a fresh run or a resumable one with the same model."""
    latest = out / CHECKPOINTS / LATEST
    if resume and not latest.exists():
        raise FileNotFoundError(f"--resume: {latest} does not exist (nothing to resume)")
    if not resume and latest.exists():
        raise FileExistsError(
            f"{out} already holds a run ({latest}); pass --resume to continue it, "
            "or choose another --out"
        )
    if resume:
        saved = from_dict(TrainConfig, load_checkpoint(latest)["config"])
        if saved.model != cfg.model:
            raise ValueError(
                f"--resume: {latest} was trained with model {to_dict(saved.model)}, "
                f"not {to_dict(cfg.model)}"
            )
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)  # partial checkpoints and grids of a killed run
    (out / DIVERGED).unlink(missing_ok=True)  # left by a driver that was killed
    with atomic_output(out / "config.yaml") as handle:
        handle.write(config_yaml(cfg).encode())


def train_worker(
    cfg: TrainConfig, data: Path, out: Path, *, resume: bool = False, progress: bool = True
) -> None:
    """The training loop of one worker (the only one, or one DDP rank under Ray Train)."""
    rank, world = _distributed_position()
    device = _pick_device()
    loop = cfg.train
    torch.manual_seed(loop.seed)  # the same initial weights on every rank

    # 1. Data: each rank reads its own equal part of the train split, less a carved val split
    # when the data has none.
    train_keys, val_rows = split_for_validation(data, cfg.data.val_split, announce=rank == 0)
    # Validation translates whole frames at the working scale, as generate does.
    canvas = canvas_side(cfg.data.working_long_side, cfg.model.depth)
    train_set = PairDataset(
        data,
        "train",
        image_size=cfg.data.image_size,
        load_size=cfg.data.load_size,
        long_side=cfg.data.long_side,
        augment=cfg.data.augment,
        shuffle=True,
        seed=loop.seed,
        even_ranks=True,
        shuffle_buffer=cfg.data.shuffle_buffer,
        keys=train_keys,
    )
    loader = DataLoader(
        train_set,
        batch_size=loop.batch_size,
        num_workers=cfg.data.loader_workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.loader_workers > 0,  # no fork per epoch
    )
    steps_per_epoch = train_set.batch_count(loop.batch_size, cfg.data.loader_workers)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{data}: {len(train_set)} train samples per worker is less than one batch of "
            f"train.batch_size={loop.batch_size}"
        )
    # Which pairs train: a resume on other data (a later phase) counts its steps on as they
    # are; only the same data is remapped to the same point of the same epoch.
    train_digest = _keys_digest(key for keys in train_set.shard_keys.values() for key in keys)
    total_steps = loop.epochs * steps_per_epoch
    if loop.max_steps:
        total_steps = min(total_steps, loop.max_steps)

    # 2. Models and optimizers (paper: Adam, lr 2e-4, betas (0.5, 0.999), no decay), and the
    # averaged G that validation and the checkpoints' users see when train.ema_power is set.
    memory_format = torch.channels_last if loop.channels_last else torch.contiguous_format
    gen = build_generator(cfg.model).to(device, memory_format=memory_format)
    disc = build_discriminator(cfg.model).to(device, memory_format=memory_format)
    betas = (loop.beta1, loop.beta2)
    opt_g = torch.optim.Adam(gen.parameters(), lr=loop.lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=loop.lr, betas=betas)
    scaler = torch.amp.GradScaler(device.type, enabled=loop.precision == "fp16")
    autocast = autocast_context(device, loop.precision)
    ema = power_ema(gen, loop.ema_power) if loop.ema_power is not None and rank == 0 else None
    trainees = Trainees(gen, disc, opt_g, opt_d, scaler, ema, loop.average_from)

    # 3. Resume, or measure the real-TIR statistics that generation reports compare against.
    step, best_ssim, last_val, tir_stats = 0, -math.inf, {}, None
    if resume:
        saved = load_checkpoint(out / CHECKPOINTS / LATEST)
        recorded = saved.get("train_keys_sha256")  # None in checkpoints before it was kept
        same_data = recorded == train_digest if recorded else saved.get("data") == str(data)
        step = saved["step"]
        if same_data:
            step = resumed_step(step, saved["steps_per_epoch"], steps_per_epoch)
        trainees.load_state_dict(saved, step)
        best_ssim, last_val, tir_stats = saved["best_ssim"], saved["val"], saved["tir_stats"]
        if step != saved["step"] and rank == 0:
            print(
                f"resuming with {steps_per_epoch} steps per epoch where the run had "
                f"{saved['steps_per_epoch']} (another --workers or batch size): step "
                f"{saved['step']} continues as step {step}, at the same point of the same "
                f"epoch; train.max_steps and average_from count in these steps"
            )
        if not same_data and rank == 0:
            print(f"resuming on other train data: steps count on from step {step}")
        if step >= total_steps and rank == 0:
            print(f"nothing to train: step {step} is already at the run's end ({total_steps})")
    elif rank == 0:
        tir_stats = real_tir_statistics(data, cfg.data.image_size)
    if world > 1:
        gen, disc = _wrap_ddp(gen), _wrap_ddp(disc)
    stats_log = StatsLog(out, step) if rank == 0 else None

    # 4. The loop: count steps; an epoch is steps_per_epoch steps on every rank.
    bar = tqdm(total=total_steps, initial=step, disable=not progress or rank != 0, unit="step")
    window_start, window_steps = time.perf_counter(), 0
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        train_set.set_epoch(epoch)
        for index, batch in enumerate(loader):
            if index < done_in_epoch:
                continue  # resuming mid-epoch: skip what the checkpoint already trained on
            # Dropout noise is a function of (seed, rank, step): resume is exact anywhere.
            torch.manual_seed(_step_seed(loop.seed, rank, step))
            set_learning_rate((opt_g, opt_d), loop, step, total_steps)
            losses = train_step(
                batch, gen, disc, opt_g, opt_d, cfg.loss, autocast, scaler, device, memory_format
            )
            losses = _mean_over_ranks(losses, world, device)
            step += 1
            window_steps += 1
            if not all(math.isfinite(v) for v in losses.values()):
                raise TrainingDiverged(_divergence_message(step, losses, out))
            if ema is not None and step > loop.average_from:
                ema.update_parameters(_unwrap(gen))  # its first update copies G
            if rank == 0 and (step % loop.log_every == 0 or step == total_steps):
                elapsed = time.perf_counter() - window_start
                rate = window_steps * loop.batch_size * world / elapsed
                record = {
                    "kind": "train",
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    **losses,
                    "samples_per_s": rate,
                    "lr": opt_g.param_groups[0]["lr"],
                }
                stats_log.write(record)
                bar.set_postfix(d=f"{losses['d']:.3g}", g=f"{losses['g']:.3g}", img_s=f"{rate:.1f}")
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)
            epoch_ends = step % steps_per_epoch == 0 or step == total_steps
            keep_step = bool(loop.checkpoint_every) and step % loop.checkpoint_every == 0
            if epoch_ends or keep_step:
                _average_buffers(gen, world)  # every rank, at the same steps
            if rank == 0 and keep_step:
                state = checkpoint_state(
                    cfg, data, trainees, step, steps_per_epoch, best_ssim, last_val, tir_stats,
                    train_digest,
                )  # fmt: skip
                save_checkpoint(out / CHECKPOINTS / f"step_{step:08d}.pt", state)
                save_checkpoint(out / CHECKPOINTS / LATEST, state)
                _drop_old_step_checkpoints(out / CHECKPOINTS, loop.keep_checkpoints)
            if not epoch_ends:
                continue
            validation_due = (step // steps_per_epoch) % loop.val_every == 0
            if rank == 0 and (validation_due or step == total_steps):
                # Validate and sample the model users will get: the averaged G when there is one.
                served = ema.module if ema is not None else _unwrap(gen)
                if val_rows:
                    last_val = validate(
                        served,
                        iter_pairs(data, val_rows),
                        canvas,
                        autocast,
                        cfg.data.val_samples,
                        long_side=cfg.data.working_long_side,
                    )
                    epoch_now = step / steps_per_epoch
                    stats_log.write({"kind": "val", "step": step, "epoch": epoch_now, **last_val})
                    write_sample_grid(
                        served,
                        iter_pairs(data, val_rows),
                        canvas,
                        autocast,
                        loop.sample_count,
                        out / "samples" / f"step_{step:08d}.png",
                        long_side=cfg.data.working_long_side,
                    )
                improved = bool(last_val) and last_val["ssim"] > best_ssim
                if improved:
                    best_ssim = last_val["ssim"]
                state = checkpoint_state(
                    cfg, data, trainees, step, steps_per_epoch, best_ssim, last_val, tir_stats,
                    train_digest,
                )  # fmt: skip
                if improved:  # best.pt before latest.pt, which a resume reads
                    save_checkpoint(out / CHECKPOINTS / BEST, state)
                save_checkpoint(out / CHECKPOINTS / LATEST, state)
            break
    bar.close()
    if stats_log is not None:
        stats_log.close()


def resumed_step(saved_step: int, saved_steps_per_epoch: int, steps_per_epoch: int) -> int:
    """The step to resume at, keeping the epoch and the fraction of it already trained.

    Each rank reads 1/world of the train split, so another worker count (or batch size)
    changes the steps in an epoch; counting on in the old steps would end the run after
    another number of epochs and skip or repeat part of the one in progress.
    """
    epoch, done_in_epoch = divmod(saved_step, saved_steps_per_epoch)
    return epoch * steps_per_epoch + done_in_epoch * steps_per_epoch // saved_steps_per_epoch


def split_for_validation(
    data: Path, val_split: str, announce: bool = True
) -> tuple[list[str] | None, list[dict[str, Any]]]:
    """(train keys, None for all of them; index rows to validate on).

    Data with no `val_split` (LLVIP and KAIST publish only train and test) validates on a
    deterministic tenth of train, carved out of training, so best.pt still exists.
    """
    rows = shards.read_index(data)
    val_rows = [r for r in rows if r["split"] == val_split]
    if val_rows:
        return None, val_rows
    carved = set(carve_val_keys(data))
    if announce:
        print(
            f"note: {data} has no {val_split!r} split; validating on {len(carved)} train pairs "
            "held out of training (a fixed tenth, chosen by key hash)"
        )
    train_keys = [r["key"] for r in rows if r["split"] == "train" and r["key"] not in carved]
    return train_keys, [r for r in rows if r["split"] == "train" and r["key"] in carved]


def power_ema(gen: nn.Module, gamma: float) -> AveragedModel:
    """An average of G's weights and BatchNorm statistics over training, step k weighted by
    k**gamma: a power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training
    Dynamics of Diffusion Models"). It has no time constant to tune to the run's length:
    gamma 0 is the plain average, larger values forget early weights faster."""

    def update(averaged, current, n_averaged):
        # Called per dtype group; after n updates, beta_n = (1 - 1/(n + 1)) ** (gamma + 1).
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)  # BatchNorm's batch counters
            return
        beta = (1 - 1 / (int(n_averaged) + 1)) ** (gamma + 1)
        torch._foreach_lerp_(averaged, current, 1 - beta)

    return AveragedModel(gen, multi_avg_fn=update, use_buffers=True)


def set_learning_rate(optimizers, loop: LoopConfig, step: int, total_steps: int) -> None:
    """The constant rate of the paper, or with `train.lr_decay_from` < 1 pix2pix's linear
    decay to zero over the last part of the run (pix2pix: the second half)."""
    decay_start = loop.lr_decay_from * total_steps
    factor = 1.0
    if step >= decay_start and loop.lr_decay_from < 1:
        factor = 1 - (step - decay_start) / (total_steps - decay_start + 1)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = loop.lr * factor


def train_step(
    batch: dict[str, Any],
    gen: nn.Module,
    disc: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    loss_cfg: LossConfig,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scaler: torch.amp.GradScaler,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """One D step then one G step, in pix2pix's order.

    Returns:
        Each loss term as a float: d, g (total) and g's weighted parts.
    """
    cond = batch["rgb"].to(device, non_blocking=True, memory_format=memory_format)  # (B, 3, S, S)
    real = batch["tir"].to(device, non_blocking=True, memory_format=memory_format)  # (B, 1, S, S)
    with autocast():
        fake = gen(cond)  # (B, C, S, S)
    # A C-channel generator learns the TIR replicated in C channels, as pix2pix on gray images.
    real = real.expand(-1, fake.shape[1], -1, -1)

    # 1. D on real pairs and on detached fake pairs, in separate forwards as pix2pix, so its
    # BatchNorm normalises each kind with its own statistics, as in G's step below.
    # With loss.d_augment, D sees every pair (real or generated) through its own random
    # transform, in both steps; G's gradient passes through the transform.
    policy = loss_cfg.d_augment
    _set_requires_grad(disc, True)
    opt_d.zero_grad(set_to_none=True)
    with autocast():
        real_logits = disc(*augment_pairs(cond, real, policy))
        fake_logits = disc(*augment_pairs(cond, fake.detach(), policy))
    loss_d = discriminator_loss(real_logits, fake_logits, loss_cfg.gan_mode)
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)

    # 2. Freeze D: G's backward needs gradients through D, not for D's weights. The bare
    # module is called so that DDP does not wait for D gradients that never come.
    _set_requires_grad(disc, False)
    opt_g.zero_grad(set_to_none=True)
    fake_logits, real_logits, matching = None, None, None
    if loss_cfg.feature_matching:
        seed = int(torch.randint(1 << 62, ()))  # one transform for the real and fake pair
        with autocast():
            with torch.no_grad():
                real_pair = augment_pairs(cond, real, policy, seed)
                real_logits, real_features = _unwrap(disc)(*real_pair, features=True)
            fake_pair = augment_pairs(cond, fake, policy, seed)
            fake_logits, fake_features = _unwrap(disc)(*fake_pair, features=True)
        matching = (
            loss_cfg.feature_matching
            * sum(
                F.l1_loss(f.float(), r.float())
                for f, r in zip(fake_features, real_features, strict=True)
            )
            / len(real_features)
        )
    elif loss_cfg.gan:
        with autocast():
            fake_logits = _unwrap(disc)(*augment_pairs(cond, fake, policy))
            if loss_cfg.gan_mode == "relativistic":
                with torch.no_grad():  # D as it is now, after its step
                    real_logits = _unwrap(disc)(*augment_pairs(cond, real, policy))

    # 3. G on the non-saturating GAN loss plus the L1, gradient and intensity terms (Eq. 7).
    loss_g, parts = generator_loss(fake_logits, real, fake.float(), loss_cfg, real_logits)
    if matching is not None:
        loss_g = loss_g + matching
        parts["g_feature_matching"] = matching.item()
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    scaler.update()
    return {"d": loss_d.item(), "g": loss_g.item(), **parts}


def autocast_context(device: torch.device, precision: str) -> Callable[[], Any]:
    """A factory of autocast contexts for `precision` (fp32: a no-op)."""
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs CUDA; use bf16 on the CPU")
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


@dataclass
class Trainees:
    """G, D, their optimizers, the grad scaler and G's average: what a checkpoint holds."""

    gen: nn.Module
    disc: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    average_from: int = 0

    def state_dict(self) -> dict[str, Any]:
        state = {
            "generator": _unwrap(self.gen).state_dict(),
            "discriminator": _unwrap(self.disc).state_dict(),
            "optim_g": self.opt_g.state_dict(),
            "optim_d": self.opt_d.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.ema is not None:
            state["generator_ema"] = self.ema.module.state_dict()  # what inference loads
        return state

    def load_state_dict(self, saved: dict[str, Any], step: int) -> None:
        """Restore a checkpoint that goes on at `step` (`resumed_step`: the counting
        `average_from` uses). A run may resume with another precision (a grad scaler only
        exists for fp16, and starts afresh) and with an average switched on (it starts from
        the resumed weights)."""
        _unwrap(self.gen).load_state_dict(saved["generator"])
        _unwrap(self.disc).load_state_dict(saved["discriminator"])
        self.opt_g.load_state_dict(saved["optim_g"])
        self.opt_d.load_state_dict(saved["optim_d"])
        if self.scaler.is_enabled() and saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None and "generator_ema" in saved:
            self.ema.module.load_state_dict(saved["generator_ema"])
            # Past `average_from` nothing older counts: at 0 updates the next one copies G.
            self.ema.n_averaged.fill_(max(0, step - self.average_from))


def checkpoint_state(
    cfg, data, trainees, step, steps_per_epoch, best_ssim, val, tir_stats, train_keys_sha256
) -> dict[str, Any]:
    """Everything a resume, `generate` and `evaluate` need, as tensors and plain values."""
    return {
        "config": to_dict(cfg),
        **trainees.state_dict(),
        "step": step,
        "epoch": step // steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "best_ssim": best_ssim,
        "val": val,
        "tir_stats": tir_stats,
        "data": str(data),
        "train_keys_sha256": train_keys_sha256,  # which pairs trained (see the resume)
        "seed": cfg.train.seed,  # with the step, fixes every random draw of the run
        "torch": str(torch.__version__),
    }


class StatsLog:
    """Append-only `stats.jsonl` (plus TensorBoard events when it is installed).

    Opening it for a resumed run drops records past the resumed step, so the log holds each
    step once.
    """

    def __init__(self, out: Path, resume_step: int):
        self.path = out / STATS
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            with atomic_output(self.path) as handle:
                handle.write("".join(f"{line}\n" for line in kept).encode())
        self.handle = self.path.open("a")
        self.tensorboard = _tensorboard_writer(out / "tensorboard")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name not in ("step", "epoch"):
                    self.tensorboard.add_scalar(f"{record['kind']}/{name}", value, record["step"])

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _run_ray_train(cfg, data, out, resume, workers, address, progress) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Starting workers that import torch can take over Ray's 60 s default on a loaded machine.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    # Verbose: rank 0's progress bar reaches the terminal through Ray's log forwarding.
    with cluster.ray_session(address, out / cluster.LOG_NAME, verbose=True):
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={
                "cfg": to_dict(cfg),
                "data": str(data),
                "out": str(out),
                "resume": resume,
                "progress": progress,
            },
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=torch.cuda.is_available()),
            run_config=RunConfig(
                name=out.name,
                storage_path=str(out / "ray"),
                failure_config=FailureConfig(max_failures=RAY_MAX_FAILURES),
            ),
        )
        trainer.fit()
        diverged = out / DIVERGED
        if diverged.exists():
            message = diverged.read_text()
            diverged.unlink()
            raise TrainingDiverged(message)


def _ray_train_loop(config: dict[str, Any]) -> None:
    cfg, out = from_dict(TrainConfig, config["cfg"]), Path(config["out"])
    # When Ray restarts a failed worker group, this run's latest checkpoint is where to go on.
    resume = config["resume"] or (out / CHECKPOINTS / LATEST).exists()
    try:
        train_worker(cfg, Path(config["data"]), out, resume=resume, progress=config["progress"])
    except TrainingDiverged as err:
        # Returned, not raised: Ray would restart the workers and they would diverge again.
        # Every rank sees the same averaged losses, so all of them get here together.
        if _distributed_position()[0] == 0:
            with atomic_output(out / DIVERGED) as handle:
                handle.write(str(err).encode())


def _distributed_position() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pick_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda")


def _mean_over_ranks(losses: dict[str, float], world: int, device) -> dict[str, float]:
    if world == 1:
        return losses
    values = torch.tensor(list(losses.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)  # also makes every rank see a non-finite loss and stop together
    return dict(zip(losses, (values / world).tolist(), strict=True))


def _divergence_message(step: int, losses: dict[str, float], out: Path) -> str:
    values = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
    latest = out / CHECKPOINTS / LATEST
    kept = f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint yet"
    return f"non-finite loss at step {step} ({values}); training stopped, {kept}"


def _keys_digest(keys) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def _drop_old_step_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` step_N.pt files (keep 0: none deleted).

    A training checkpoint holds G, D and both optimizers' moments, so a long run that keeps
    one every few hundred steps fills a disk; latest.pt and best.pt are never touched.
    """
    if keep <= 0:
        return
    for stale in sorted(folder.glob("step_*.pt"))[:-keep]:
        stale.unlink(missing_ok=True)


def _step_seed(seed: int, rank: int, step: int) -> int:
    digest = hashlib.sha256(f"{seed}-{rank}-{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _wrap_ddp(module: nn.Module) -> DistributedDataParallel:
    # BatchNorm buffers are not re-broadcast before each forward (see the module docstring);
    # torch 2.14 renamed the option, older releases only know broadcast_buffers.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(module, forward_sync_buffers=False)
    return DistributedDataParallel(module, broadcast_buffers=False)


def _average_buffers(gen: nn.Module, world: int) -> None:
    """Average G's BatchNorm running statistics over the ranks before rank 0 saves them;
    each rank estimates them from its own part of the data."""
    if world == 1:
        return
    for buffer in _unwrap(gen).buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(str(path))
