"""Files and directories written so that a reader, or a crash at any moment, finds the old copy or the new one.

Torch-free: the retrieval index and the data tools use it too.

A file is written next to its destination, flushed to disk and renamed over it (`atomic_write`,
`atomic_path`). A directory is built next to its destination and swapped in by `replace_dir`: where the
kernel can exchange two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`), the new copy takes the old
one's place at once and the old copy is deleted afterwards; elsewhere the old copy is first moved aside to
`.<name>.replaced`, and `recover_dir` (called by `replace_dir` and by readers that need it) moves it back if
a crash came between the two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from lavis_lite.errors import UserError


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write` a temporary file next to `path`, fsync it and rename it over `path` (mode as open() gives)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a partial one."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path` for a writer that wants a file name (savefig, safetensors, tarfile);
    renamed over `path` when the block ends without an error, removed otherwise. The suffix is kept."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _mode(0o666))  # mkstemp's 0600 would make results unreadable to anyone else
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def staging_dir(final: str | Path) -> Path:
    """A new empty directory next to `final` to build its replacement in."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(staged, _mode(0o777))  # mkdtemp's 0700 would hide results (checkpoints, indexes) from others
    return staged


def _mode(full: int) -> int:
    """`full` less the process's umask: the mode open() and mkdir() give the other results."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def replace_dir(new: str | Path, final: str | Path) -> None:
    """Make the finished directory `new` the one at `final` and delete the copy it replaces (if any)."""
    new, final = Path(new), Path(final)
    recover_dir(final)
    if not final.exists():
        os.rename(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new)  # now the old copy
        return
    aside = _aside(final)
    os.rename(final, aside)
    os.rename(new, final)
    shutil.rmtree(aside)


def recover_dir(final: str | Path) -> None:
    """Undo a replacement that a crash interrupted between its two renames (systems without an exchange)."""
    final = Path(final)
    aside = _aside(final)
    if aside.exists():
        if final.exists():
            shutil.rmtree(aside)
        else:
            os.rename(aside, final)


def remove_dir(path: str | Path) -> None:
    """Delete a directory so that a crash leaves it whole or gone: it is first renamed to a temporary name
    (`.NAME.*.tmp`, which `remove_staging` removes), then deleted."""
    path = Path(path)
    doomed = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.rename(path, doomed)  # onto the empty directory mkdtemp made: atomic on POSIX
    shutil.rmtree(doomed)


def remove_staging(parent: str | Path, name: str = "*") -> list[Path]:
    """What interrupted writers of `parent/name` left in `parent` (`name="*"`: a folder with one writer, such as
    a run's checkpoints): a copy set aside mid-replacement is put back or dropped (`recover_dir`), staging
    folders and temporary files (`.NAME.*.tmp*`) are removed. Returns the removed paths."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    for replaced in parent.glob(f".{name}.replaced"):
        recover_dir(parent / replaced.name[1 : -len(".replaced")])
    leftovers = sorted(parent.glob(f".{name}.*.tmp*"))
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return leftovers


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.replaced")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def check_writable(path: str | Path, setting: str, directory: bool = False) -> None:
    """UserError naming `setting` unless a file (`directory`: a directory) can be written at `path`, checked
    before long work, not after: not a directory (a file), no file where a parent directory should be, and the
    nearest existing parent writable."""
    path = Path(path)
    if path.is_dir() and not directory:
        raise UserError(f"{setting} {path} is a directory: give a file path")
    if path.exists() and directory and not path.is_dir():
        raise UserError(f"{setting} {path} is a file: give a directory path")
    if directory and path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{setting} {path} is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{setting} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{setting} {path}: {parent} is not writable")
