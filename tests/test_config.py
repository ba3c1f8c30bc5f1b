import pytest

from tirsynth.config import IngestConfig, dump_config, load_config


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "ingest.yaml"
    path.write_text("shard_size: 10\nsplit: [0.5, 0.5, 0]\nsources: [a, b]\n")
    cfg = load_config(path, IngestConfig, ["daynight=auto", "shard_size=3"])
    assert cfg.shard_size == 3 and cfg.daynight == "auto"
    assert cfg.split == (0.5, 0.5, 0.0) and cfg.sources == ("a", "b")
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml", IngestConfig) == cfg


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'shardsize'"):
        load_config(None, IngestConfig, ["shardsize=3"])


def test_bad_choice_and_type_are_refused():
    with pytest.raises(ValueError, match="daynight='dusk'"):
        load_config(None, IngestConfig, ["daynight=dusk"])
    with pytest.raises(ValueError, match="shard_size: expected int"):
        load_config(None, IngestConfig, ["shard_size=many"])
    with pytest.raises(ValueError, match="split"):
        IngestConfig(split=(1.0, -1.0, 0.0))


def test_documented_defaults_file_matches_the_code():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "ingest.yaml"
    assert load_config(path, IngestConfig) == IngestConfig()
