"""Writing outputs so that a crash never leaves a half-written file or folder under the final name.

The new content is written under a temporary name beside the target (``.NAME.tmp-PID-RANDOM-HOST``), flushed to
disk, then renamed over it. The temporary name carries the writer's process id and host, so a later write into the
same folder removes what a killed writer (``kill -9``, power loss) left behind, and never what a live one is writing.
Final files and folders get the permissions the umask gives (0644 / 0755 under umask 022), as with ``open()`` and
``mkdir``, not the 0600 / 0700 of ``tempfile.mkstemp`` / ``mkdtemp`` or of files that libraries write through
their own temporary file (safetensors' ``save_file`` does).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

# This machine, short enough to keep names under the 255-byte limit: a dead-writer check only makes sense for
# writers on the same host (a shared filesystem may be written from several).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+-(?P<host>[0-9a-f]{8})$")


def _temp_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}-{_HOST}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Clean up after writers on this host that died in ``folder``: delete their temporary files and folders.

    A writer killed between moving the previous version aside and renaming the new one into place leaves no
    file under the final name; the previous version is put back then.

    Returns:
        What was removed or put back.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if not m or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        target = Path(folder, m["name"])
        if m["kind"] == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.replace(entry.path, target)
        elif entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        removed.append(Path(entry.path))
    return removed


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's content (a folder: its entries) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _new_file_mode(folder: Path) -> int:
    """The permissions a new file created in ``folder`` gets (the umask, and any default ACL, applied to 0666)."""
    probe = _temp_name(folder / "probe", "tmp")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink()


def _set_mode(path: Path, file_mode: int, dir_mode: int) -> None:
    """Give ``path`` the umask's permissions; an executable file stays executable where the umask allows."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        wanted = dir_mode
    else:
        wanted = file_mode | (dir_mode & 0o111 if st.st_mode & 0o111 else 0)
    if stat.S_IMODE(st.st_mode) != wanted:
        os.chmod(path, wanted)


def _finish_tree(root: Path, file_mode: int, dir_mode: int) -> None:
    """Give everything under ``root`` the umask's permissions and flush it to disk, each folder after its content."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            file = Path(folder, name)
            if not file.is_symlink():
                _set_mode(file, file_mode, dir_mode)
                _fsync(file)
        _set_mode(Path(folder), file_mode, dir_mode)
        _fsync(Path(folder))


def _refuse_file(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; give a folder path to write to")


def _foreign_entries(path: str | os.PathLike, owns: Callable[[str], bool]) -> list[str]:
    """What in folder ``path`` a writer that ``owns`` those names did not put there, sorted (none if it is absent).

    Raises:
        ValueError: ``path`` is a file, not a folder.
    """
    path = Path(path)
    _refuse_file(path)
    return sorted(name for name in os.listdir(path) if not owns(name)) if path.exists() else []


def refuse_foreign(path: str | os.PathLike, owns: Callable[[str], bool]) -> None:
    """Refuse to replace folder ``path`` while it holds anything but what its writer ``owns``: replacing the
    folder would delete the rest (a run's checkpoints, a project's files)."""
    foreign = _foreign_entries(path, owns)
    if foreign:
        raise ValueError(f"{path} already holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, which this "
                         f"writer did not make; writing here replaces the whole folder and would delete them. "
                         f"Write to a new or empty folder (e.g. {Path(path) / 'out'}), or move them away first")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, owns: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on error it is deleted.

    An existing ``path`` is kept untouched until the new folder is complete, and is replaced only if everything in
    it is the writer's: a name the new folder has too, or one ``owns`` claims (e.g. a shard an earlier export
    wrote). Anything else is refused (ValueError) before the folder changes.
    """
    path = Path(path)
    _refuse_file(path)  # before any work
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent)
    tmp = _temp_name(path, "tmp")
    tmp.mkdir()  # plain mkdir: the umask decides the mode, as for any folder the user creates
    try:
        dir_mode, file_mode = stat.S_IMODE(tmp.stat().st_mode), _new_file_mode(tmp)
        yield tmp
        _finish_tree(tmp, file_mode, dir_mode)
        written = set(os.listdir(tmp))
        refuse_foreign(path, lambda name: name in written or (owns is not None and owns(name)))
        if path.exists():
            old = _temp_name(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; on success it replaces ``path``, on error it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent)
    tmp = _temp_name(path, "tmp")
    # O_EXCL: never reuse a name; mode 0o666 filtered by the umask, as open(path, "w") would create it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    file_mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        yield tmp
        _set_mode(tmp, file_mode, file_mode | (file_mode & 0o444) >> 2)  # exec bits where read is allowed
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["atomic_dir", "atomic_file", "refuse_foreign", "remove_leftovers"]
