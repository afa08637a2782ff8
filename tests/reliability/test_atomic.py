"""Atomic writes: the umask decides the final permissions, failures leave nothing, dead writers are cleaned up."""

import os
import stat
import subprocess
import sys

import pytest

import lora
from lora.atomic import atomic_dir, atomic_file, remove_leftovers
from conftest import make_llama


@pytest.fixture
def umask():
    """Run the test under a given umask, restoring the old one after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o002, 0o664, 0o775)])
def test_final_files_and_folders_get_the_umask_permissions(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    with atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inner.txt").write_text("x")
    assert mode(tmp_path / "a.json") == file_mode
    assert mode(tmp_path / "folder") == dir_mode
    assert mode(tmp_path / "folder" / "inner.txt") == file_mode


def test_a_saved_adapter_is_readable_by_others_under_umask_022(tmp_path, umask):
    umask(0o022)
    model = make_llama()
    lora.inject(model, lora.LoraConfig(r=2))
    out = lora.save_adapter(model, tmp_path / "adapter")
    assert mode(out) == 0o755
    modes = {p.name: mode(p) for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes  # safetensors itself writes 0600 files


def test_replacing_keeps_the_old_version_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "v").write_text("2")
        assert (target / "v").read_text() == "1"
        raise RuntimeError("crash while writing")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "f") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert (target / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary file or folder remains


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_what_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    """A ``kill -9`` during a write leaves the temporary; the next write into that folder removes it."""
    import lora.atomic as atomic

    dead = dead_pid()
    stale_dir = tmp_path / f".step-0000003.tmp-{dead}-0badc0de-{atomic._HOST}"
    stale_dir.mkdir()
    (stale_dir / "trainable.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".metrics.json.tmp-{dead}-0badc0de-{atomic._HOST}"
    stale_file.write_text("{")
    live = tmp_path / f".metrics.json.tmp-{os.getpid()}-0badc0de-{atomic._HOST}"  # a writer still at work
    live.write_text("{")
    other_host = tmp_path / f".metrics.json.tmp-{dead}-0badc0de-ffffffff"  # same pid, another machine
    other_host.write_text("{")
    users = tmp_path / ".step-0000003.tmp-notes"  # looks similar, but is not ours
    users.write_text("keep")

    with atomic_file(tmp_path / "metrics.json") as tmp:
        tmp.write_text("{}")
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and other_host.exists() and users.read_text() == "keep"


def test_a_writer_killed_between_the_two_renames_gets_the_previous_version_back(tmp_path):
    import lora.atomic as atomic

    dead = dead_pid()
    old = tmp_path / f".adapter.old-{dead}-0badc0de-{atomic._HOST}"  # moved aside; the new one never arrived
    old.mkdir()
    (old / "adapter_config.json").write_text("{}")
    assert remove_leftovers(tmp_path) == [old]
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"
    assert not old.exists()
