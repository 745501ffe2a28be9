"""Atomic writes: whoever reads a file or folder lorakit writes sees the old one or the new one, never half.

A resuming run, a server watching a run folder and a browser reloading eval.html all read while
lorakit writes. Everything is written under a temporary name beside its target and renamed into place
in one step; a failed write (disk full, permissions) removes the temporary copy, keeps what the target
held, and becomes one LorakitError naming the target.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from lorakit.errors import LorakitError

# safetensors and torch.save report a full disk as their own errors (RuntimeError), not as OSError.
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, it replaces `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False))


def _beside(path: Path) -> Path:
    """A new temporary folder beside `path` (same file system: renaming it onto `path` is one step)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        # mkdtemp makes the folder private (0700); the result should have the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except OSError as e:
        raise write_error(path, e) from None
    return tmp


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; once the block has filled it, it replaces `path`."""
    path = Path(path)
    tmp = _beside(path)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(path, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def write_once(path: str | Path, complete: str) -> Iterator[Path | None]:
    """A folder that, once there, is never replaced: a cache that several processes may fill at the same time.

    Yields None when `path` already holds `complete` (the file every whole copy has); else a temporary folder
    beside `path` for the block to fill, renamed into place in one step. When another process renamed its
    copy first, that one stays and this one is dropped: the first finished copy wins, so a process already
    reading it never sees it swapped (`atomic_dir` replaces; this does not).
    """
    path = Path(path)
    if (path / complete).is_file():
        yield None
        return
    tmp = _beside(path)
    try:
        yield tmp
        if path.exists() and not (path / complete).is_file():
            shutil.rmtree(path)  # an incomplete folder left by hand: ours only ever appear whole
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / complete).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def why_not_deletable(folder: Path, marker: str, data: Iterable[str | None] = ()) -> str | None:
    """Why `--overwrite` must not delete `folder`, or None: lorakit deletes its own results (a folder holding
    `marker`, or an empty one), never the working folder or one above it, nor a folder holding the data."""
    target, here = folder.resolve(), Path.cwd().resolve()
    if target == here or target in here.parents:
        return "is the working folder or one above it"
    if any(target in Path(p).resolve().parents for p in data if p):
        return "holds this run's data"
    if any(folder.iterdir()) and not (folder / marker).is_file():
        return f"has no {marker}, so lorakit did not write it"
    return None


def write_error(path: Path, e: Exception) -> LorakitError:
    return LorakitError(
        f"could not write {path}: {getattr(e, 'strerror', None) or e}. Nothing half-written was "
        "left there. Free disk space or fix permissions, then run again (`lorakit train ... "
        "--resume` continues a training run from its last checkpoint)."
    )
