"""The atomic-write helper: a destination holds complete-old or complete-new content, never a mix."""

from __future__ import annotations

import errno
import os
import stat
import sys

import pytest

from boft_diffusion.atomic import atomic_file, atomic_write_text, staged_dir


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- atomic_file -----------------------------------------------------------------------------------
def test_file_appears_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    assert names(tmp_path) == ["out.bin"]


def test_file_replaces_old_content_only_at_the_end(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_file(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert names(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), disk_full(), KeyboardInterrupt()])
def test_file_error_keeps_old_content_and_leaves_no_temporary(tmp_path, error):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(type(error)), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise error
    assert target.read_text() == "old"
    assert names(tmp_path) == ["out.txt"]


def test_file_disk_full_leaves_nothing_and_removes_created_parents(tmp_path):
    with pytest.raises(OSError) as info, atomic_file(tmp_path / "a" / "b" / "out.png") as tmp:
        tmp.write_bytes(b"\x89PNG")
        raise disk_full()
    assert info.value.errno == errno.ENOSPC
    assert names(tmp_path) == []


def test_file_without_replace_refuses_an_existing_path(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"), atomic_file(target, replace=False):
        pytest.fail("the block must not run")
    late = tmp_path / "late.safetensors"
    with (
        pytest.raises(FileExistsError, match="appeared while writing"),
        atomic_file(late, replace=False) as tmp,
    ):
        tmp.write_text("new")
        late.write_text("theirs")
    assert target.read_text() == "mine"
    assert (tmp_path / "late.safetensors").read_text() == "theirs"
    assert names(tmp_path) == ["late.safetensors", "out.safetensors"]
    with atomic_file(tmp_path / "fresh", replace=False) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "fresh").read_text() == "new"
    assert names(tmp_path) == ["fresh", "late.safetensors", "out.safetensors"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_file_gets_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    new = atomic_write_text(tmp_path / "README.md", "# hi\n")
    assert new.read_text(encoding="utf-8") == "# hi\n"
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0o600
    kept = tmp_path / "script.sh"
    kept.write_text("old")
    kept.chmod(0o750)
    atomic_write_text(kept, "new")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o750


# --- staged_dir ------------------------------------------------------------------------------------
def test_dir_appears_only_on_success(tmp_path):
    target = tmp_path / "export"
    with staged_dir(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".export.tmp-")
        (staging / "model.safetensors").write_bytes(b"weights")
        assert not target.exists()
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert names(tmp_path) == ["export"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), disk_full(), KeyboardInterrupt()])
def test_dir_error_leaves_nothing_and_removes_created_parents(tmp_path, error):
    with pytest.raises(type(error)), staged_dir(tmp_path / "new" / "deeper" / "out") as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise error
    assert names(tmp_path) == []


def test_dir_error_keeps_parents_that_existed(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(OSError), staged_dir(tmp_path / "runs" / "new" / "out"):
        raise disk_full()
    assert names(tmp_path) == ["runs"] and names(tmp_path / "runs") == []


def test_dir_without_replace_refuses_an_existing_target(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"), staged_dir(target):
        pytest.fail("the block must not run")
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(FileExistsError), staged_dir(tmp_path / "a_file"):
        pytest.fail("the block must not run")
    assert (target / "keep.txt").read_text() == "mine"
    assert names(tmp_path) == ["a_file", "taken"]


def test_dir_without_replace_keeps_a_target_that_appeared_meanwhile(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while writing"), staged_dir(target) as staging:
        (staging / "new.txt").write_text("new")
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")
    assert names(target) == ["theirs.txt"]
    assert names(tmp_path) == ["out"]


def test_dir_replace_keeps_old_content_until_the_swap(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_dir(target, replace=True) as staging:
        (staging / "new.txt").write_text("new")
        assert names(target) == ["old.txt"]
    assert names(target) == ["new.txt"]
    assert names(tmp_path) == ["cache"]  # the old folder, moved aside, is gone


def test_dir_replace_error_keeps_old_content(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError), staged_dir(target, replace=True) as staging:
        (staging / "new.txt").write_text("half")
        raise disk_full()
    assert names(target) == ["old.txt"]
    assert names(tmp_path) == ["cache"]


def test_dir_replace_never_deletes_old_content_it_could_not_put_back(tmp_path, monkeypatch):
    import boft_diffusion.atomic as atomic

    target = tmp_path / "cache"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def swap_fails_and_the_place_is_taken(staging, where):
        where.mkdir()  # someone else's folder took the place in between
        (where / "theirs.txt").write_text("theirs")
        raise disk_full()

    monkeypatch.setattr(atomic, "_rename_new", swap_fails_and_the_place_is_taken)
    with pytest.raises(OSError), staged_dir(target, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert names(target) == ["theirs.txt"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".cache.old-")]
    assert len(kept) == 1 and (kept[0] / "cache" / "old.txt").read_text() == "old"


def test_dir_replace_predicate_decides_for_the_folder_found(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "stale").write_text("")

    def is_stale(folder):
        return (folder / "stale").exists()

    with staged_dir(target, replace=is_stale) as staging:
        (staging / "fresh").write_text("")
    assert names(target) == ["fresh"]
    with pytest.raises(FileExistsError, match="already exists"), staged_dir(target, replace=is_stale):
        pytest.fail("a fresh folder is kept")
    # A fresh folder finished by someone else while this call wrote is kept; this one is discarded.
    (target / "fresh").rename(target / "stale")
    late = pytest.raises(FileExistsError, match="appeared while writing")
    with late, staged_dir(target, replace=is_stale) as staging:
        (staging / "mine").write_text("")
        (target / "stale").rename(target / "fresh")
    assert names(target) == ["fresh"]
    assert names(tmp_path) == ["cache"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_dir_gets_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    with staged_dir(tmp_path / "out"):
        pass
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0o700
