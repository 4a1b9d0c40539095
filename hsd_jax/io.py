"""Atomic file writes: a reader (or a crash) never sees half a file.

Also the checks every command runs on its output paths before any work starts,
so a bad path costs a one-line error, not a decoded file thrown away.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from hsd_jax.errors import HsdError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it over `path` only on success."""
    path = _through_links(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, _new_file_mode(path))  # mkstemp makes 0600; the result should look like any written file
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _through_links(path: str | os.PathLike) -> Path:
    """Where a write to `path` lands: a symlink's target (e.g. /dev/stdout's), since renaming
    a new file over the path would replace the link itself."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


def _new_file_mode(path: Path) -> int:
    """The mode `open(path, "w")` would leave: an existing file's own, else 0666 less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it can only be read by setting it."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --- JSON lines written as work finishes ------------------------------------------------

def partial_path(path: str | os.PathLike) -> Path:
    """Where `JsonlAppender` keeps the rows of an unfinished `path`."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def settings_path(path: str | os.PathLike) -> Path:
    """Where `JsonlAppender` keeps the settings the rows of an unfinished `path` were made with."""
    path = Path(path)
    return path.with_name(path.name + ".settings.json")


def read_settings(path: str | os.PathLike) -> dict | None:
    """The settings of an unfinished `path`; None when none were saved (or they are unreadable)."""
    try:
        settings = json.loads(settings_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


class JsonlAppender:
    """JSON lines added batch by batch to `<path>.partial`, renamed to `path` by `finish()`.

    So `path` only ever appears complete, and after each `append` the rows so far are
    on disk. Each append writes a copy of the partial file plus the new rows and renames
    it over the old one: at every moment (a reader, a crash, Ctrl-C) the file holds whole
    lines only, so `--resume` never has a torn line to repair. The copy is small next to
    the decoding of a batch.

    `rows` are those an earlier run left (in the partial file or in `path`); the first
    append writes them afresh, replacing any partial file there was. `settings` (what
    made the rows) go to `<path>.settings.json` before the first rows, so a resume can
    refuse to mix rows made two ways; `finish()` removes the file.
    """

    def __init__(self, path: str | os.PathLike, rows: Sequence[dict] = (), settings: dict | None = None):
        self.path = _through_links(path)
        self.partial = partial_path(self.path)
        self.settings = settings
        # The temporary copy an append was writing when its run was killed (kill -9, power loss):
        # never renamed, so never read, and it would stay there hidden.
        for stale in self.partial.parent.glob(f".{glob.escape(self.partial.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
        self._earlier = list(rows)
        self.written = False  # whether an append has written the partial file
        self.count = len(self._earlier)  # rows safe on disk

    def append(self, rows: Iterable[dict]) -> None:
        new = list(rows)
        if not self.written and self.settings is not None:
            write_json(settings_path(self.path), self.settings)
        with atomic_path(self.partial) as tmp:
            if self.written:
                shutil.copyfile(self.partial, tmp)
            with open(tmp, "a" if self.written else "w") as f:
                lines = new if self.written else self._earlier + new
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in lines)
                f.flush()
                os.fsync(f.fileno())  # the rename must not land before the rows do
        self.written = True
        self.count += len(new)

    def finish(self) -> Path:
        """Renames the partial file to `path`, which then holds every row."""
        if not self.written:
            self.append([])
        os.replace(self.partial, self.path)
        settings_path(self.path).unlink(missing_ok=True)
        return self.path


def read_jsonl_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON lines file that hsd-jax wrote (one object a line)."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise HsdError(f"{path}:{n} is not a JSON line ({err.msg}); it was not written by hsd-jax") from err
        if not isinstance(row, dict):
            raise HsdError(f"{path}:{n} is not a JSON object; it was not written by hsd-jax")
        rows.append(row)
    return rows


# --- output paths, checked before the work ------------------------------------------------

def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                      flag: str = "--output") -> None:
    """Raises `HsdError` unless a file can be written at `path` without harming `inputs`.

    Checks what would otherwise fail only after the work: `path` is a directory, lies
    under a regular file, lies in a directory this process cannot write (missing
    directories on the way are created later), or is one of the input files.
    """
    path = Path(path)
    if path.is_dir():
        raise HsdError(f"{flag} {path} is a directory; give a file name, e.g. {path / 'out.jsonl'}")
    if path.exists() and not path.is_file():  # the atomic rename would replace the device node itself
        raise HsdError(f"{flag} {path} is not a regular file (a terminal, device, pipe or socket); hsd-jax "
                       "writes a new file and renames it over the path, so give a file name")
    path = _through_links(path)  # atomic_path writes there
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise HsdError(f"{flag} {path} is the input file {source}; writing it would destroy the input, "
                           "so choose another output file")
    _check_writable_parent(path, flag)


def check_output_dir(path: str | os.PathLike, flag: str = "--output") -> None:
    """Raises `HsdError` unless `path` is, or can be made, a directory this process can write in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HsdError(f"{flag} {path} is a file, not a directory; give a directory (it is created if missing)")
    if path.is_dir():
        _check_writable(path, path, flag)
    else:
        _check_writable_parent(path, flag)


def _check_writable_parent(path: Path, flag: str) -> None:
    """The nearest existing folder above `path` must be a writable directory."""
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise HsdError(f"{flag} {path} lies under {ancestor}, which is a file, not a directory; "
                       "choose another path")
    _check_writable(ancestor, path, flag)


def _check_writable(directory: Path, path: Path, flag: str) -> None:
    # os.access sees permissions, read-only mounts and immutable directories, and writes nothing.
    if not os.access(directory, os.W_OK | os.X_OK):
        raise HsdError(f"{flag} {path}: the directory {directory} is not writable; choose another path "
                       "or fix its permissions")
    # What os.access cannot see (root's access, /proc and other special file systems) shows
    # when a file is made there; it is removed at once.
    try:
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        raise HsdError(f"{flag} {path}: cannot create a file in {directory} ({err.strerror or err}); "
                       "choose another path") from None


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # also through hard links and symlinks
    return a.resolve() == b.resolve()
