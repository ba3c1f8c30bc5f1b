import itertools
import os

import pytest
from conftest import write_csv, write_pair

from tirsynth import layouts


def test_roadscene_layout_is_detected_and_paired(roadscene_dir):
    pairs, rejects, layout = layouts.discover(roadscene_dir)
    assert layout == "roadscene" and not rejects
    assert [p.key for p in pairs][:2] == ["roadscene_FLIR_00000", "roadscene_FLIR_00001"]
    assert all(p.split is None and p.daynight is None for p in pairs)


def test_llvip_keeps_its_split_night_and_voc_labels(llvip_dir):
    pairs, rejects, layout = layouts.discover(llvip_dir)
    assert layout == "llvip" and not rejects and len(pairs) == 6
    assert {p.split for p in pairs} == {"train", "test"}
    assert {p.daynight for p in pairs} == {"night"}
    labels = layouts.read_annotation(pairs[0].annotation)
    assert labels["objects"] == [{"name": "person", "bbox": [1.0, 2.0, 11.0, 22.0]}]


def test_kaist_sets_give_split_and_daynight(kaist_dir):
    pairs, rejects, layout = layouts.discover(kaist_dir)
    assert layout == "kaist" and not rejects
    got = {p.key: (p.split, p.daynight) for p in pairs}
    assert got == {
        "kaist_set00_V000_I00000": ("train", "day"),
        "kaist_set03_V000_I00000": ("train", "night"),
        "kaist_set06_V000_I00000": ("test", "day"),
        "kaist_set09_V000_I00000": ("test", "night"),
    }
    labels = layouts.read_annotation(pairs[0].annotation)
    assert labels["objects"][0] == {"name": "person", "bbox": [5.0, 6.0, 7.0, 8.0], "occlusion": 1}


def test_generic_folders_match_by_relative_stem(tmp_path):
    root = tmp_path / "mine"
    # Duplicate names in different folders, spaces and unicode in paths.
    for seed, rel in enumerate(("a/img 1", "b/img 1", "üñí/ß")):
        write_pair(root / "rgb" / f"{rel}.png", root / "thermal" / f"{rel}.png", seed)
    write_pair(root / "rgb" / "lonely.png", root / "elsewhere" / "x.png", 1)
    (root / "rgb" / "notes.txt").write_text("not an image")
    pairs, rejects, layout = layouts.discover(root)
    assert layout == "folders"
    keys = [p.key for p in pairs]
    assert len(keys) == 3 == len(set(keys))
    assert all("." not in k and "/" not in k and k.isascii() for k in keys)
    reasons = sorted(r.reason for r in rejects)
    assert reasons == ["missing TIR partner", "not an image file (extension '.txt')"]


def test_same_stem_twice_in_one_folder_is_ambiguous(tmp_path):
    write_pair(tmp_path / "rgb" / "a.png", tmp_path / "tir" / "a.png", 0)
    write_pair(tmp_path / "rgb" / "a.jpg", tmp_path / "tir" / "b.png", 1, fmt="JPEG")
    pairs, rejects, _ = layouts.discover(tmp_path)
    assert [p.key for p in pairs] == []
    assert sum("ambiguous RGB" in r.reason for r in rejects) == 2
    assert any(r.reason == "missing RGB partner" for r in rejects)  # tir/b.png


def test_csv_of_pairs(tmp_path):
    write_pair(tmp_path / "v" / "x.png", tmp_path / "t" / "x.png", 0)
    listing = write_csv(
        tmp_path / "pairs.csv",
        [
            {"rgb": "v/x.png", "tir": "t/x.png", "split": "val", "daynight": "day"},
            {"rgb": "", "tir": "t/x.png", "split": "", "daynight": ""},
        ],
    )
    pairs, rejects, layout = layouts.discover(listing)
    assert layout == "csv"
    assert [(p.key, p.split, p.daynight) for p in pairs] == [("pairs_v_x", "val", "day")]
    assert "empty rgb or tir path" in rejects[0].reason


def test_paths_leading_outside_the_dataset_are_rejects(tmp_path):
    """A CSV cell or a link inside a pair folder that leads out of the dataset is a reject,
    never read."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    write_pair(data / "v" / "x.png", data / "t" / "x.png", 0)
    write_pair(outside / "v.png", outside / "t.png", 1)
    listing = write_csv(
        data / "pairs.csv",
        [
            {"rgb": "v/x.png", "tir": "t/x.png"},
            {"rgb": "../outside/v.png", "tir": "t/x.png"},
            {"rgb": "v/x.png", "tir": str(outside / "t.png")},
            {"rgb": "v\\..\\..\\outside\\v.png", "tir": "t/x.png"},
        ],
    )
    pairs, rejects, _ = layouts.discover(listing)
    assert [p.key for p in pairs] == ["pairs_v_x"]
    assert [r.reason for r in rejects] == [
        f"CSV line {n}: path outside the input folder (the CSV's folder)" for n in (3, 4, 5)
    ]
    folders = tmp_path / "folders"
    write_pair(folders / "rgb" / "a.png", folders / "tir" / "a.png", 2)
    (folders / "rgb" / "b.png").symlink_to(outside / "v.png")
    (folders / "tir" / "b.png").symlink_to(outside / "t.png")
    pairs, rejects, _ = layouts.discover(folders)
    assert [p.key for p in pairs] == ["folders_a"]
    assert sorted(r.reason for r in rejects) == ["path outside the input folder"] * 2


def test_unknown_layout_names_the_choices(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ValueError, match="--layout"):
        layouts.discover(tmp_path)


def test_keys_are_stable_and_distinct_after_sanitising():
    assert layouts.make_key("d", "a b") != layouts.make_key("d", "a_b")
    assert layouts.make_key("d", "x.y/z") == layouts.make_key("d", "x.y/z")
    assert "." not in layouts.make_key("d", "x.y/z")


def test_split_extension_is_splitext():
    # Every name of up to six characters from ".", "a" and "b" (dots leading, trailing,
    # doubled, alone).
    names = ["".join(p) for n in range(7) for p in itertools.product(".ab", repeat=n)]
    assert all(layouts._split_extension(n) == os.path.splitext(n) for n in names)
