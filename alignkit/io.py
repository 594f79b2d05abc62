"""Every file alignkit writes goes through here: atomic files and folders, JSON lines.

A file or folder written with these helpers either exists complete or does not exist: the
content goes to a hidden temporary name in the same folder and is renamed into place (a rename
within one file system is atomic), and the temporary name is removed when writing fails. A crash
therefore never leaves a half-written checkpoint, cache, figure or report that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def unwritable(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why ``path`` (a file or folder to write, perhaps under folders still to create; with ``folder``, a
    folder, so an existing file there is refused too) cannot be written here, worded to follow "cannot be
    written: ", or None when it can."""
    path = Path(path).absolute()
    if folder and path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    anchor = path
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if anchor != path and not anchor.is_dir():
        return f"{anchor} is a file, not a folder"
    folder = anchor if anchor.is_dir() else anchor.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"no write permission on {folder}"
    try:   # permissions are not the whole story (a read-only mount, /proc): try it
        fd, probe = tempfile.mkstemp(prefix=".alignkit-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:   # e.g. /proc, which takes no new files
        return f"{folder} does not take new files ({err.strerror or err})"
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    ``write`` receives the temporary path (for writers that want a file name, such as matplotlib's
    ``savefig`` or safetensors' ``save_file``). The parent folder is created when missing. On any
    failure the temporary file is removed and the exception propagates; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the result should read like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (non-JSON scalars such as numpy floats become floats)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=float) + "\n")


def _readable_by_all(folder: Path) -> None:
    """Files 0644 and folders 0755 under ``folder``: safetensors writes its files owner-only (0600),
    which would keep an adapter or model from being shared or served as another user."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(Path(root) / name, 0o755)
        for name in files:
            os.chmod(Path(root) / name, 0o644)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Fill a temporary folder beside ``path`` inside the block; on success it becomes ``path``.

    With ``replace`` an existing ``path`` is swapped out for the new folder (and then deleted);
    without it, an existing ``path`` is left alone and ``FileExistsError`` is raised after the block
    (another writer finished first). On failure inside the block the temporary folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        _readable_by_all(tmp)
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} already exists")
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (created when missing), flushed to the OS.

    One ``write`` call per line, so a crash can cut at most the last line, which
    :func:`read_jsonl` then skips.
    """
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=float) + "\n")


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], int]:
    """The JSON objects of a JSON-lines file, and how many non-empty lines were not objects.

    Blank lines are ignored; a line that is not a JSON object (a line cut by a crash, stray text)
    is counted in the second value rather than raised, so a caller can warn about it once.
    """
    records, bad = [], 0
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(value, dict):
            records.append(value)
        else:
            bad += 1
    return records, bad
