"""Atomic file writes: a reader (or a crash) never sees half a file.

Also the checks every command runs on its output paths before any work starts,
so a bad path costs a one-line error, not a decoded file thrown away, and the lock
(`output_lock`) that keeps a second run out of an output a live run writes.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import stat
import sys
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
    on disk. The first append writes the partial file afresh (atomically: the rows an
    earlier run left, then the new ones); each later one appends its rows to it, in one
    write, and syncs them, so an append costs its own rows, not the whole file again.
    An append that fails (a full disk, Ctrl-C) cuts the file back to the rows before it,
    so the file holds whole lines only; the one thing that can leave a torn last line
    is a crash inside the write (kill -9, power loss), and `read_jsonl_rows(...,
    torn_tail=True)`, which `--resume` reads the partial file with, drops that line.

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
        if not self.written:
            if self.settings is not None:
                write_json(settings_path(self.path), self.settings)
            with atomic_path(self.partial) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(_jsonl_text(self._earlier + new))
                f.flush()
                os.fsync(f.fileno())  # the rename must not land before the rows do
            self.written = True
            self._earlier = []
        elif new:
            data = memoryview(_jsonl_text(new).encode("utf-8"))
            fd = os.open(self.partial, os.O_WRONLY | os.O_APPEND)  # unbuffered: nothing is left to flush later
            try:
                end = os.fstat(fd).st_size
                try:
                    while data:
                        data = data[os.write(fd, data):]
                    os.fsync(fd)
                except BaseException:  # a full disk, Ctrl-C: leave only the whole lines before this batch
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, end)
                    raise
            finally:
                os.close(fd)
        self.count += len(new)

    def finish(self) -> Path:
        """Renames the partial file to `path`, which then holds every row."""
        if not self.written:
            self.append([])
        os.replace(self.partial, self.path)
        settings_path(self.path).unlink(missing_ok=True)
        return self.path


def _jsonl_text(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_jsonl_rows(path: str | os.PathLike, torn_tail: bool = False) -> list[dict]:
    """The rows of a JSON lines file that hsd-jax wrote (one object a line).

    `torn_tail=True` drops a last line that has no newline and does not parse: what a
    crash in the middle of a `JsonlAppender.append` leaves (the rows before it are whole).
    """
    path = Path(path)
    data = path.read_bytes()
    if torn_tail and data and not data.endswith(b"\n"):  # the write that would have ended the line was cut
        head, newline, last = data.rpartition(b"\n")
        try:
            whole = isinstance(json.loads(last.decode("utf-8")), dict)
        except ValueError:  # UnicodeDecodeError too: the cut can fall inside a character
            whole = False
        if not whole:
            data = head + newline
    rows = []
    for n, line in enumerate(data.decode("utf-8").split("\n"), 1):
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


# --- one live run per output ----------------------------------------------------------------

def lock_path(path: str | os.PathLike) -> Path:
    """Where `output_lock` keeps the lock of an output file: `<path>.lock` beside the file
    a write to `path` lands in."""
    path = _through_links(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def output_lock(lock: str | os.PathLike, output: str | os.PathLike, *, what: str, flag: str = "--output",
                keep: bool = False) -> Iterator[None]:
    """Holds an OS lock (flock) on the file `lock` while the block runs, so that a second
    run into `output` is refused, in one `HsdError` naming the process that holds it
    ("--output X is in use by another `what` (process N)"), instead of mixing its writes
    with this run's.

    The OS drops the lock when its process dies (kill -9 too), so a crash leaves no stale
    lock. At the end the lock file is removed (unless `keep`) while still held: a run that
    opened it meanwhile sees that the file it locked is gone and takes the new one. The
    folders made for the lock file are removed again when nothing else was put in them.
    Without flock (Windows) the block runs unlocked; on a file system that refuses locks
    (some NFS mounts) too, with a note on stderr.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = Path(lock)
    made = []  # the folders this call creates, outermost first
    for folder in reversed([lock.parent, *lock.parent.parents]):
        if not folder.exists():
            made.append(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = None
    try:
        handle = _take_lock(fcntl, lock, output, what, flag)
        yield
    finally:
        if handle is not None:
            if not keep:
                lock.unlink(missing_ok=True)
            handle.close()  # releases the lock
        for folder in reversed(made):
            try:
                folder.rmdir()  # only while empty
            except OSError:
                break


def _take_lock(fcntl, lock: Path, output, what: str, flag: str):
    """The open, locked lock file holding this process's id; None where locks are refused."""
    for _ in range(100):  # a new try each time a holder removed the file as this one opened it
        handle = open(lock, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise HsdError(f"{flag} {output} is in use by another {what} (process {holder}); wait for it to "
                           f"end, or choose another {flag}") from None
        except OSError as err:
            handle.close()
            print(f"note: cannot lock {lock} ({err.strerror or err}), so nothing stops a second run into {output}",
                  file=sys.stderr)
            return None
        try:
            ours = os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            ours = False
        if ours:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")  # names the holder to a refused run
            handle.flush()
            return handle
        handle.close()
    raise HsdError(f"cannot take the lock {lock}: it is removed and made again as fast as it is opened")


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
