import os

import pytest

from tirsynth.containment import (
    LINK_LOOP,
    NOT_REGULAR,
    NOT_UTF8,
    OUTSIDE,
    clean_relpath,
    relpath_inside,
    target_inside,
    walk_files,
)


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize(
    "name, clean",
    [
        ("a/b.png", "a/b.png"),
        ("../../outside/evil.jpg", "outside/evil.jpg"),
        ("/etc/hostname", "etc/hostname"),
        ("..\\..\\win\\x.jpg", "win/x.jpg"),
        ("C:\\Users\\x.jpg", "Users/x.jpg"),
        ("a/./b//c/../d.png", "a/b/c/d.png"),  # `..` dropped, never applied
        ("a\0b.png", "ab.png"),
    ],
)
def test_clean_relpath_removes_every_way_out(name, clean):
    assert clean_relpath(name) == clean


@pytest.mark.parametrize("name", ["", "..", "/", "../..", "\\\\", "C:"])
def test_clean_relpath_refuses_names_of_no_file(name):
    with pytest.raises(ValueError, match="names no file"):
        clean_relpath(name)


def test_relpath_inside_resolves_names_and_links(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    touch(root / "a" / "x.png")
    touch(outside / "evil.png")
    (root / "out-link").symlink_to(outside)
    (root / "in-link").symlink_to(root / "a")
    assert relpath_inside(root, "a/x.png") == "a/x.png"
    assert relpath_inside(root, "a/../a/x.png") == "a/x.png"
    assert relpath_inside(root, "a\\x.png") == "a/x.png"
    assert relpath_inside(root, str(root / "a" / "x.png")) == "a/x.png"
    assert relpath_inside(root, "in-link/x.png") == "in-link/x.png"
    for name in ("../outside/evil.png", str(outside / "evil.png"), "out-link/evil.png",
                 "..\\outside\\evil.png", "a/../../outside/evil.png", "..", "."):  # fmt: skip
        assert relpath_inside(root, name) is None, name


def test_walk_files_names_every_file_it_does_not_take(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    touch(root / "a" / "1.png")
    touch(root / "b" / "2.png")
    touch(root / ".hidden.png")
    touch(outside / "evil.png")
    (root / "link-out.png").symlink_to(outside / "evil.png")
    (root / "dir-out").symlink_to(outside)
    (root / "dir-in").symlink_to(root / "b")  # a second name for b/: listed under it too
    (root / "a" / "up").symlink_to(root / "a")  # a loop
    (root / "self").symlink_to(root / "self")
    os.mkfifo(root / "fifo.png")
    bad_name = os.fsdecode(b"caf\xff.png")
    touch(root / bad_name)
    found = dict(walk_files(root))
    assert found["a/1.png"] is None and found["b/2.png"] is None
    assert found["dir-in/2.png"] is None
    assert found["link-out.png"].startswith(OUTSIDE)
    assert found["dir-out"].startswith(OUTSIDE)
    assert found["a/up"] == LINK_LOOP and found["self"] == LINK_LOOP
    assert found["fifo.png"] == NOT_REGULAR
    assert found["caf\ufffd.png"] == NOT_UTF8
    assert ".hidden.png" not in found and not any("evil" in name for name in found)
    assert all(name.encode("utf-8") for name in found)


def test_walk_files_of_a_folder_that_leads_outside_its_root(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "images").symlink_to(tmp_path / "outside")
    assert list(walk_files(tmp_path / "root" / "images", tmp_path / "root")) == [("", OUTSIDE)]


def test_target_inside_writes_only_under_the_target(tmp_path):
    to = tmp_path / "to"
    assert target_inside(to, "../../x/y.png") == to / "x" / "y.png"
    assert target_inside(to, "/etc/passwd") == to / "etc" / "passwd"
    (tmp_path / "elsewhere").mkdir()
    to.mkdir()
    (to / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="leads outside"):
        target_inside(to, "linked/y.png")
