"""Atomic files and directories: a crash at any point leaves the old copy or the new one, never neither."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lavis_lite import io

ROOT = Path(__file__).resolve().parent.parent

# Builds `final` (the old copy) if absent, then replaces it with a new copy, killing itself with SIGKILL at
# the step named by argv[3]: after the exchange, or after the first / second rename of the two-rename path.
CRASH = """
import os, signal, sys
from pathlib import Path
from lavis_lite import io

final, mechanism, kill_after = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
final.mkdir()
(final / "data.txt").write_text("old")
new = io.staging_dir(final)
(new / "data.txt").write_text("new")
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if mechanism == "exchange":
    exchange = io._exchange
    io._exchange = lambda a, b: exchange(a, b) and die()
else:
    io._exchange = lambda a, b: False
    renames, rename = [0], os.rename
    def counted(a, b):
        rename(a, b)
        renames[0] += 1
        if renames[0] == int(kill_after):
            die()
    io.os.rename = counted
io.replace_dir(new, final)
"""


@pytest.mark.parametrize("mechanism, kill_after", [("exchange", "1"), ("renames", "1"), ("renames", "2")],
                         ids=["after-exchange", "between-the-two-renames", "after-both-renames"])
def test_a_replacement_killed_between_its_steps_leaves_the_old_or_the_new_copy(tmp_path, mechanism, kill_after):
    final = tmp_path / "dir"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(final), mechanism, kill_after], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9, proc.stderr[-2000:]  # it did die mid-replacement
    io.recover_dir(final)  # what replace_dir and the readers of replaced directories do first
    assert (final / "data.txt").read_text() in ("old", "new")
    io.replace_dir(_dir_with(tmp_path / "again", "newer"), final)  # and the next replacement goes through
    assert (final / "data.txt").read_text() == "newer"
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "dir")
    assert all(name.startswith(".dir.") and name.endswith(".tmp") for name in left)  # the dead writer's staging only


def test_replace_dir_without_an_old_copy_and_with_the_exchange_unavailable(tmp_path, monkeypatch):
    final = tmp_path / "dir"
    io.replace_dir(_dir_with(tmp_path / "a", "first"), final)
    assert (final / "data.txt").read_text() == "first"
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    io.replace_dir(_dir_with(tmp_path / "b", "second"), final)
    assert (final / "data.txt").read_text() == "second" and sorted(os.listdir(tmp_path)) == ["dir"]


def test_atomic_files_keep_the_old_content_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.json"
    io.atomic_write_text(path, "old")
    assert path.read_text() == "old" and oct(path.stat().st_mode & 0o777) == "0o644"

    def failing(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        io.atomic_write(path, failing)
    with pytest.raises(RuntimeError), io.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk on fire")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.json"]
    with io.atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png"  # writers that pick the format from the name (savefig) still can
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_a_checkpoint_saved_again_replaces_the_old_one_whole(tmp_path):
    """The checkpoint writer goes through replace_dir (re-saving a step used to delete it first)."""
    import torch
    from torch import nn

    from lavis_lite.checkpoint import load_weights, save_checkpoint

    model = nn.Linear(2, 1)
    first = save_checkpoint(tmp_path, 5, model, {"step": 5}, {"a": 1})
    with torch.no_grad():
        model.weight.fill_(3.0)
    calls = []
    exchange = io._exchange
    io._exchange = lambda a, b: calls.append((a, b)) or exchange(a, b)
    try:
        again = save_checkpoint(tmp_path, 5, model, {"step": 5}, {"a": 1})
    finally:
        io._exchange = exchange
    assert again == first and len(calls) == 1
    assert torch.equal(load_weights(again)["weight"], torch.full((1, 2), 3.0))


def _dir_with(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "data.txt").write_text(text)
    return path


def test_io_imports_without_torch():
    code = "import sys, lavis_lite.io, retrieval.metadata; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_written_files_and_directories_get_the_modes_of_other_results(tmp_path):
    """Not mkstemp's 0600 nor mkdtemp's 0700: what open() and mkdir() give under the process's umask."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").write_text("x")
    io.atomic_write_text(tmp_path / "atomic.txt", "x")
    staged = io.staging_dir(tmp_path / "result")
    (staged / "inside.txt").write_text("x")
    io.replace_dir(staged, tmp_path / "result")
    mode = lambda p: p.stat().st_mode & 0o777
    assert mode(tmp_path / "atomic.txt") == mode(tmp_path / "plain.txt")
    assert mode(tmp_path / "result") == mode(tmp_path / "plain")
    assert mode(tmp_path / "plain") != 0o700
