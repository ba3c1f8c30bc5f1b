import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tirsynth import shards, train
from tirsynth.checkpoint import load_checkpoint, load_generator, save_checkpoint
from tirsynth.cli import cli
from tirsynth.config import TrainConfig, load_config
from tirsynth.data import PairDataset
from tirsynth.inference import iter_pairs
from tirsynth.losses import adversarial_loss
from tirsynth.models import build_discriminator, build_generator
from tirsynth.quality import validate

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def tiny_cfg(*overrides: str) -> TrainConfig:
    return load_config(TINY, TrainConfig, list(overrides))


def stats(run: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


def test_train_step_updates_g_and_d_with_finite_losses(learnable_shards):
    cfg = tiny_cfg()
    gen, disc = build_generator(cfg.model), build_discriminator(cfg.model)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    batch = next(
        iter(
            torch.utils.data.DataLoader(PairDataset(learnable_shards, image_size=32), batch_size=3)
        )
    )
    before_g = [p.clone() for p in gen.parameters()]
    before_d = [p.clone() for p in disc.parameters()]
    d_batches = []  # D's input batch sizes, forward by forward
    disc.register_forward_hook(lambda m, args, out: d_batches.append(len(args[0])))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = train.train_step(
        batch,
        gen,
        disc,
        opt_g,
        opt_d,
        cfg.loss,
        train.autocast_context(torch.device("cpu"), "fp32"),
        scaler,
        torch.device("cpu"),
    )
    assert set(losses) == {"d", "g", "g_gan", "g_l1", "g_intensity", "g_gradient"}
    assert all(math.isfinite(v) for v in losses.values())
    assert all(not torch.equal(a, b) for a, b in zip(before_g, gen.parameters(), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(before_d, disc.parameters(), strict=True))
    assert all(p.requires_grad for p in disc.parameters()) is False  # D frozen after its step
    # pix2pix: D's step runs real and fake pairs in separate forwards (separate BatchNorm
    # statistics), as G's step does with the fake pairs; not one concatenated batch.
    assert d_batches == [3, 3, 3]


def test_three_channel_generator_learns_the_tir_in_every_channel(learnable_shards):
    """The paper configs: G outputs 3 channels, the real TIR is replicated to match, and the
    intensity term is its own loss, not a copy of L1."""
    cfg = tiny_cfg("model.out_channels=3")
    gen, disc = build_generator(cfg.model), build_discriminator(cfg.model)
    loader = torch.utils.data.DataLoader(PairDataset(learnable_shards, image_size=32), batch_size=3)
    losses = train.train_step(
        next(iter(loader)),
        gen,
        disc,
        torch.optim.Adam(gen.parameters()),
        torch.optim.Adam(disc.parameters()),
        cfg.loss,
        train.autocast_context(torch.device("cpu"), "fp32"),
        torch.amp.GradScaler("cpu", enabled=False),
        torch.device("cpu"),
    )
    # With one channel, 30 L1(I) is 0.3 x 100 L1; with three channels the two differ.
    assert abs(losses["g_intensity"] / losses["g_l1"] - 0.3) > 1e-3


def first_batch(shards: Path) -> dict:
    loader = torch.utils.data.DataLoader(PairDataset(shards, image_size=32), batch_size=3)
    return next(iter(loader))


def fp32_step(batch: dict, gen, disc, cfg: TrainConfig) -> dict[str, float]:
    """One train_step on the CPU in fp32 with fresh Adam optimizers."""
    return train.train_step(
        batch, gen, disc, torch.optim.Adam(gen.parameters()), torch.optim.Adam(disc.parameters()),
        cfg.loss, train.autocast_context(torch.device("cpu"), "fp32"),
        torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"),
    )  # fmt: skip


def test_feature_matching_pulls_g_towards_ds_view_of_the_real_pair(learnable_shards):
    """loss.feature_matching: L1 between D's activations on the real and the generated
    pair, layer by layer, as a G term; D's own step is unchanged."""
    cfg = tiny_cfg("loss.feature_matching=10")
    gen, disc = build_generator(cfg.model), build_discriminator(cfg.model)
    batch = first_batch(learnable_shards)
    rgb, tir = batch["rgb"], batch["tir"]
    logits, features = disc(rgb, tir, features=True)
    assert torch.equal(logits, disc(rgb, tir)) and len(features) == cfg.model.disc_layers + 1
    with torch.no_grad():
        expected = 10 * sum(
            (f - r).abs().mean()
            for f, r in zip(disc(rgb, gen(rgb), features=True)[1], features, strict=True)
        ) / len(features)  # fmt: skip
    assert expected > 0
    losses = fp32_step(batch, gen, disc, cfg)
    assert math.isfinite(losses["g_feature_matching"]) and losses["g_feature_matching"] > 0
    total = sum(v for k, v in losses.items() if k.startswith("g_"))
    assert losses["g"] == pytest.approx(total, rel=1e-5)


def test_relativistic_gan_trains_g_and_d(learnable_shards):
    """loss.gan_mode=relativistic: a step updates D and G, and G's GAN term is finite."""
    cfg = tiny_cfg("loss.gan_mode=relativistic")
    gen, disc = build_generator(cfg.model), build_discriminator(cfg.model)
    batch = first_batch(learnable_shards)
    d_before = [p.detach().clone() for p in disc.parameters()]
    g_before = [p.detach().clone() for p in gen.parameters()]
    losses = fp32_step(batch, gen, disc, cfg)
    assert math.isfinite(losses["g_gan"]) and losses["g_gan"] > 0 and math.isfinite(losses["d"])
    assert any(not torch.equal(b, p) for b, p in zip(d_before, disc.parameters(), strict=True))
    assert any(not torch.equal(b, p) for b, p in zip(g_before, gen.parameters(), strict=True))


def test_spectral_d_and_d_augment_train_with_finite_losses(learnable_shards):
    """model.disc_norm=spectral and loss.d_augment: a step updates G and D; D's view of a
    pair is augmented in both steps, so its logits on the same pair differ from call to
    call while the model's own forward does not."""
    cfg = tiny_cfg("model.disc_norm=spectral", "loss.d_augment=color,translation,cutout",
                   "loss.feature_matching=10")  # fmt: skip
    gen, disc = build_generator(cfg.model), build_discriminator(cfg.model)
    batch = first_batch(learnable_shards)
    before = [p.detach().clone() for p in disc.parameters()]
    losses = fp32_step(batch, gen, disc, cfg)
    assert all(math.isfinite(v) for v in losses.values()) and losses["g_feature_matching"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, disc.parameters(), strict=True))


def test_multiscale_d_trains_every_scale_and_averages_their_gan_losses(learnable_shards, tmp_path):
    """model.disc_scales=2 (pix2pixHD): a step updates both PatchGANs; G's GAN term is the
    mean of the scales' losses, so loss.gan keeps its weight; bf16 training runs and its
    checkpoint holds both scales."""
    cfg = tiny_cfg("model.disc_scales=2", "loss.gan_mode=lsgan", "loss.feature_matching=10")
    gen, disc = build_generator(cfg.model), build_discriminator(cfg.model)
    batch = first_batch(learnable_shards)
    before = [[p.detach().clone() for p in scale.parameters()] for scale in disc.scales]
    losses = fp32_step(batch, gen, disc, cfg)
    assert all(math.isfinite(v) for v in losses.values()) and losses["g_feature_matching"] > 0
    for old, scale in zip(before, disc.scales, strict=True):
        assert any(not torch.equal(b, p) for b, p in zip(old, scale.parameters(), strict=True))
    maps = [torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 2, 2)]
    assert adversarial_loss(maps, True, "lsgan").item() == pytest.approx(0.5)
    run = train.run(tiny_cfg("model.disc_scales=2", "train.precision=bf16", "train.max_steps=2"),
                    learnable_shards, tmp_path / "ms", progress=False)  # fmt: skip
    saved = load_checkpoint(run.checkpoint)["discriminator"]
    assert any(k.startswith("scales.1.") for k in saved)
    assert all(math.isfinite(r["d"]) for r in stats(tmp_path / "ms", "train"))


def test_power_ema_weights_later_steps_more(learnable_shards, tmp_path):
    cfg = tiny_cfg("train.max_steps=12", "train.epochs=100", "train.ema_power=3")
    result = train.run(cfg, learnable_shards, tmp_path / "ema", progress=False)
    state = load_checkpoint(result.checkpoint)
    assert set(state["generator_ema"]) == set(state["generator"])
    differs = [
        k for k, v in state["generator_ema"].items() if not torch.equal(v, state["generator"][k])
    ]
    assert differs  # an average, not a copy
    gen, _ = load_generator(result.checkpoint)  # what generate and evaluate translate with
    for name, tensor in gen.state_dict().items():
        assert torch.equal(tensor, state["generator_ema"][name])
    # Resume restores the average: 6 + 6 steps equal 12.
    train.run(tiny_cfg("train.max_steps=6", "train.epochs=100", "train.ema_power=3"),
              learnable_shards, tmp_path / "split", progress=False)  # fmt: skip
    resumed = train.run(cfg, learnable_shards, tmp_path / "split", resume=True, progress=False)
    again = load_checkpoint(resumed.checkpoint)["generator_ema"]
    for name, tensor in state["generator_ema"].items():
        assert torch.allclose(tensor.float(), again[name].float(), atol=1e-6), name


def test_average_from_restarts_the_average_on_resume(learnable_shards, tmp_path):
    """train.average_from=N: steps up to N are left out of the average. Resuming a run at
    N with it set restarts the average there: one step later it is a copy of G; without it
    the average still carries the earlier steps."""
    first = tiny_cfg("train.max_steps=6", "train.epochs=100", "train.ema_power=3")
    for name, average_from in (("restart", 6), ("carry", 0)):
        train.run(first, learnable_shards, tmp_path / name, progress=False)
        more = tiny_cfg("train.max_steps=7", "train.epochs=100", "train.ema_power=3",
                        f"train.average_from={average_from}")  # fmt: skip
        resumed = train.run(more, learnable_shards, tmp_path / name, resume=True, progress=False)
        state = load_checkpoint(resumed.checkpoint)
        ema, gen = state["generator_ema"], state["generator"]
        same = all(torch.equal(v, gen[k]) for k, v in ema.items())
        assert same == (average_from == 6), name


def test_power_ema_is_a_power_weighted_average():
    gen = build_generator(tiny_cfg().model)
    ema = train.power_ema(gen, 0.0)  # gamma 0: the plain mean of every step's weights
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            for p in gen.parameters():
                p.fill_(value)
        ema.update_parameters(gen)
    assert torch.allclose(next(ema.module.parameters()), torch.tensor(3.0))


def test_learning_rate_constant_or_linear_decay():
    cfg = tiny_cfg("train.lr=1.0", "train.lr_decay_from=0.5")
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    rates = []
    for step in range(10):
        train.set_learning_rate([optimizer], cfg.train, step, 10)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[:5] == [1.0] * 5 and rates[5] == 1.0
    assert all(a > b for a, b in zip(rates[5:], rates[6:], strict=False)) and rates[-1] > 0
    train.set_learning_rate([optimizer], tiny_cfg("train.lr=1.0").train, 9, 10)
    assert optimizer.param_groups[0]["lr"] == 1.0  # the paper: no decay


def test_data_without_val_split_validates_on_a_carved_part_of_train(tmp_path, capsys):
    """LLVIP-like data (train only) still validates and writes best.pt; the carved pairs are
    never trained on, and the choice is the same every run."""
    from conftest import write_pair

    from tirsynth import ingest
    from tirsynth.config import IngestConfig

    root = tmp_path / "pairs"
    for i in range(20):
        write_pair(root / "rgb" / f"p{i:02d}.png", root / "tir" / f"p{i:02d}.png", i)
    data = tmp_path / "data"
    ingest.run(IngestConfig(rgb_dir=str(root / "rgb"), tir_dir=str(root / "tir"), out=str(data),
                            split=(1.0, 0.0, 0.0)))  # fmt: skip
    train_keys, val_rows = train.split_for_validation(data, "val")
    assert len(val_rows) == 2 and not {r["key"] for r in val_rows} & set(train_keys)
    assert len(train_keys) == 18
    assert train.split_for_validation(data, "val", announce=False)[1] == val_rows
    result = train.run(tiny_cfg("train.max_steps=4", "train.epochs=100"), data, tmp_path / "r",
                       progress=False)  # fmt: skip
    assert "validating on 2 train pairs" in capsys.readouterr().out
    assert result.best_checkpoint is not None and result.val["samples"] == 2


def test_validation_scores_as_evaluate_does(learnable_shards, tiny_checkpoint, tmp_path):
    """best.pt is chosen under the user's protocol: val SSIM is evaluate's SSIM on val."""
    from tirsynth import evaluate
    from tirsynth.config import EvaluateConfig

    state = load_checkpoint(tiny_checkpoint)
    result = evaluate.run(
        EvaluateConfig(data=str(learnable_shards), out=str(tmp_path / "ev"), split="val",
                       checkpoint=str(tiny_checkpoint), precision="fp32", baselines=False),
        progress=False,
    )  # fmt: skip
    (name,) = result.results
    assert result.results[name]["overall"]["ssim"] == pytest.approx(state["val"]["ssim"], abs=1e-9)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_learns_a_mapping(learnable_shards, tmp_path, precision):
    """G learns inverted luma: L1 falls by half and val SSIM rises by 0.25 in 200 steps."""
    cfg = tiny_cfg(
        "train.max_steps=200",
        "train.epochs=1000",
        "train.lr=1e-3",
        "train.log_every=10",
        f"train.precision={precision}",
    )
    torch.manual_seed(cfg.train.seed)
    val_rows = [r for r in shards.read_index(learnable_shards) if r["split"] == "val"]
    untrained = validate(build_generator(cfg.model), iter_pairs(learnable_shards, val_rows), 32)
    result = train.run(cfg, learnable_shards, tmp_path / "run", progress=False)
    l1 = [r["g_l1"] for r in stats(result.out, "train")]
    first, last = sum(l1[:3]) / 3, sum(l1[-3:]) / 3
    print(
        f"{precision}: L1 {first:.2f} -> {last:.2f}; "
        f"val SSIM {untrained['ssim']:.3f} -> {result.val['ssim']:.3f}"
    )
    assert result.step == 200
    assert last < 0.5 * first
    assert result.val["ssim"] > untrained["ssim"] + 0.25
    assert set(result.val["by_daynight"]) == {"day", "night"}


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_resume_is_exact(learnable_shards, tmp_path, loader_workers):
    """2k steps in one go equal k steps, a stop, and k more after --resume (CPU)."""
    # 41 train samples, batch 4: 10 steps per epoch; k = 7 stops mid-epoch, 2k crosses one.
    workers = f"data.loader_workers={loader_workers}"
    cfg = tiny_cfg("train.epochs=5", "train.max_steps=14", workers)
    whole = train.run(cfg, learnable_shards, tmp_path / "whole", progress=False)
    half = tiny_cfg("train.epochs=5", "train.max_steps=7", workers)
    train.run(half, learnable_shards, tmp_path / "split", progress=False)
    # What a kill during a checkpoint or a report leaves: removed by the resume.
    leftovers = [tmp_path / "split" / "checkpoints" / ".latest.pt.k2j3.tmp",
                 tmp_path / "split" / "grids" / ".step_7.png.a8b.tmp"]  # fmt: skip
    for leftover in leftovers:
        leftover.parent.mkdir(exist_ok=True)
        leftover.write_bytes(b"partial")
    resumed = train.run(cfg, learnable_shards, tmp_path / "split", resume=True, progress=False)
    assert not any(leftover.exists() for leftover in leftovers)
    assert whole.step == resumed.step == 14 and whole.epoch == 1
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    for part in ("generator", "discriminator"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name} differs"
    for name, state in a["optim_g"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optim_g"]["state"][name]["exp_avg"])
    steps = [r["step"] for r in stats(tmp_path / "split", "train")]
    assert steps == list(range(1, 15))  # the log holds each step once


def test_resume_with_other_steps_per_epoch_keeps_the_epoch(learnable_shards, tmp_path, capsys):
    """Another --workers (or batch size) changes the steps in an epoch; a resume goes on at
    the same point of the same epoch and trains the configured number of epochs."""
    # 41 train samples: 10 steps of 4 per epoch; 20 steps of 2.
    run = tmp_path / "run"
    train.run(tiny_cfg("train.epochs=2", "train.max_steps=13"), learnable_shards, run,
              progress=False)  # fmt: skip
    resumed = train.run(
        tiny_cfg("train.epochs=2", "train.batch_size=2"), learnable_shards, run, resume=True,
        progress=False,
    )  # fmt: skip
    assert "step 13 continues as step 26" in capsys.readouterr().out
    assert resumed.step == 40 and resumed.epoch == 2
    # A max_steps counted in the old steps can end before the mapped step: said, not silent.
    train.run(tiny_cfg("train.epochs=2", "train.max_steps=30", "train.batch_size=4"),
              learnable_shards, run, resume=True, progress=False)  # fmt: skip
    assert "nothing to train: step 20 is already at the run's end (20)" in capsys.readouterr().out
    assert train.resumed_step(13, 10, 20) == 26
    assert train.resumed_step(26, 20, 10) == 13
    assert train.resumed_step(7, 10, 10) == 7


def test_resume_on_other_train_data_counts_the_steps_on(learnable_shards, tmp_path, capsys):
    """A later phase on other pairs (fewer steps per epoch here) goes on at the checkpoint's
    step, so its max_steps and average_from are counted as the earlier phase's were."""
    fewer = tmp_path / "fewer"
    shutil.copytree(learnable_shards, fewer)
    rows = shards.read_index(fewer)
    train_rows = [r for r in rows if r["split"] == "train"]
    shutil.rmtree(fewer / shards.INDEX)  # a folder of fragments; one file reads the same
    shards.write_table(fewer / shards.INDEX, [r for r in rows if r not in train_rows[:12]])
    run = tmp_path / "run"
    train.run(tiny_cfg("train.max_steps=4"), learnable_shards, run, progress=False)
    capsys.readouterr()
    resumed = train.run(
        tiny_cfg("train.max_steps=6"), fewer, run, resume=True, progress=False,
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "resuming on other train data: steps count on from step 4" in printed
    assert "continues as step" not in printed
    state = load_checkpoint(resumed.checkpoint)
    assert resumed.step == state["step"] == 6
    assert state["optim_g"]["state"][0]["step"] == 6  # 4 + 2 updates, none repeated


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(learnable_shards, tmp_path):
    run = tmp_path / "run"
    train.run(tiny_cfg("train.max_steps=3"), learnable_shards, run, progress=False)
    good = load_checkpoint(run / "checkpoints" / "latest.pt")
    # An L1 weight beyond float32's range makes the loss infinite on the next step.
    with pytest.raises(train.TrainingDiverged, match="non-finite loss at step 4"):
        train.run(
            tiny_cfg("train.max_steps=6", "loss.l1=1e39"),
            learnable_shards,
            run,
            resume=True,
            progress=False,
        )
    kept = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert kept["step"] == 3
    assert all(torch.equal(v, good["generator"][k]) for k, v in kept["generator"].items())


def test_run_dir_guards(learnable_shards, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train.run(tiny_cfg(), learnable_shards, run, resume=True)
    train.run(tiny_cfg("train.max_steps=1"), learnable_shards, run, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train.run(tiny_cfg(), learnable_shards, run)
    with pytest.raises(ValueError, match="was trained with model"):
        train.run(tiny_cfg("model.ngf=8"), learnable_shards, run, resume=True)


def test_checkpoint_contents_and_generator_reload(learnable_shards, tmp_path):
    result = train.run(
        tiny_cfg("train.max_steps=2"), learnable_shards, tmp_path / "r", progress=False
    )
    state = load_checkpoint(result.checkpoint)
    assert {
        "config",
        "generator",
        "discriminator",
        "optim_g",
        "optim_d",
        "step",
        "seed",
        "tir_stats",
        "val",
    } <= set(state)
    hist = state["tir_stats"]["intensity_hist"]
    assert hist.shape == (256,) and abs(hist.sum().item() - 1) < 1e-9
    assert state["tir_stats"]["images"] == len(PairDataset(learnable_shards, "train"))
    best = load_checkpoint(result.best_checkpoint)
    val_ssims = [r["ssim"] for r in stats(result.out, "val")]
    assert state["best_ssim"] == best["val"]["ssim"] == max(val_ssims)  # latest knows the best
    gen, _ = load_generator(result.checkpoint)
    rgb = torch.rand(1, 3, 32, 32) * 2 - 1
    assert gen(rgb).shape == (1, 1, 32, 32)
    assert (result.out / "config.yaml").exists()
    assert sorted(p.name for p in (result.out / "samples").iterdir())


def test_keep_checkpoints_leaves_only_the_newest_step_files(learnable_shards, tmp_path):
    run = tmp_path / "r"
    overrides = ("train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    result = train.run(tiny_cfg(*overrides), learnable_shards, run, progress=False)
    names = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert names == ["best.pt", "latest.pt", "step_00000003.pt", "step_00000004.pt"]
    assert load_checkpoint(run / "checkpoints" / "step_00000004.pt")["step"] == 4
    assert load_checkpoint(result.checkpoint)["step"] == 4
    every = train.run(
        tiny_cfg("train.max_steps=3", "train.checkpoint_every=1"),
        learnable_shards,
        tmp_path / "all",
        progress=False,
    )
    assert len(list((every.out / "checkpoints").glob("step_*.pt"))) == 3  # 0 keeps all
    with pytest.raises(ValueError, match="keep_checkpoints"):
        tiny_cfg("train.keep_checkpoints=-1")


class Arbitrary:
    def __reduce__(self):
        return (print, ("pickled code ran",))


# torch warns that a plain pickle.dumps file uses a newer protocol than its own files.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_checkpoint_with_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "tirsynth-checkpoint", "payload": Arbitrary()}, path)
    with pytest.raises(ValueError, match="not a loadable"):
        load_checkpoint(path)
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError):
        load_checkpoint(path)
    save_checkpoint(tmp_path / "ok.pt", {"step": 1})
    assert load_checkpoint(tmp_path / "ok.pt")["step"] == 1


def test_cli_train_and_resume(learnable_shards, tmp_path):
    run = str(tmp_path / "run")
    args = ["train", "--config", str(TINY), "--data", str(learnable_shards), "--out", run]
    result = CliRunner().invoke(cli, [*args, "--set", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output and "val SSIM" in result.output
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--resume" in again.output
    resumed = CliRunner().invoke(
        cli,
        [
            "train",
            "--data",
            str(learnable_shards),
            "--out",
            run,
            "--resume",
            "--set",
            "train.max_steps=4",
        ],
    )
    assert resumed.exit_code == 0, resumed.output
    assert "trained 4 steps" in resumed.output
    dry = CliRunner().invoke(cli, [*args, "--dry-run", "--set", "train.lr=0.001"])
    assert "lr: 0.001" in dry.output


def test_ray_train_two_workers(learnable_shards, tmp_path, ray_session):
    """--workers 2 through Ray Train (DDP over gloo) writes a checkpoint generate can load."""
    cfg = tiny_cfg("train.max_steps=6", "train.epochs=100")
    result = train.run(cfg, learnable_shards, tmp_path / "ddp", workers=2, progress=False)
    state = load_checkpoint(result.checkpoint)
    per_rank = len(PairDataset(learnable_shards, "train")) // 2
    assert state["step"] == 6 and state["steps_per_epoch"] == per_rank // 4
    gen, _ = load_generator(result.checkpoint)
    assert gen(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    assert [r["step"] for r in stats(result.out, "train")] == list(range(1, 7))
    # Resumed under Ray, a divergence on every rank comes back as TrainingDiverged (not a
    # Ray error, and without Ray restarting the workers) and leaves step 6's checkpoint.
    with pytest.raises(train.TrainingDiverged, match="non-finite loss at step 7"):
        diverging = tiny_cfg("train.max_steps=9", "train.epochs=100", "loss.l1=1e39")
        train.run(diverging, learnable_shards, result.out, workers=2, resume=True, progress=False)
    assert load_checkpoint(result.checkpoint)["step"] == 6
