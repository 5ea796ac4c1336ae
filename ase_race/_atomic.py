"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Every write goes to a temporary file in the target's folder (hidden:
``.<name>.<host>.<pid>.<random>.tmp``), is flushed and fsynced, gets the permissions of the
file it replaces (0644 for a new file), and is renamed over the target with :func:`os.replace`,
which is atomic on one file system. If the writer raises, the temporary file is removed and the
old file is left as it was. Concurrent writers to one path do not corrupt it: the last rename
wins, whole. A writer killed mid-write (SIGKILL, power loss) cannot remove its temporary file;
the next write to the same path removes those left by processes of this host that no longer
run. Temporary files of other hosts (a shared file system) are left alone: whether their
writer still runs cannot be known from here.

A leaf module: the standard library only (torch is imported inside :func:`atomic_torch_save`).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

NEW_FILE_MODE = 0o644


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(handle)`` on a temporary binary file, then rename it to ``path``.

    Missing parent folders are created. Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600: give it the old file's permissions, or the usual ones.
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = NEW_FILE_MODE
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _host() -> str:
    """This host's name as it appears in temporary file names (no dots, no separators)."""
    return "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of killed writers to ``path`` (this host only); return them.

    A name is ``.<name>.<host>.<pid>.<random>.tmp`` with ``<random>`` free of dots, so it is read
    from the right: a file of another target whose name extends this one's (``a`` and ``a.b``)
    parses to another host and is never touched.
    """
    path = Path(path)
    prefix, host, removed = f".{path.name}.", _host(), []
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return removed
    for candidate in candidates:
        parts = candidate.name[len(prefix):].rsplit(".", 3)
        if len(parts) != 4 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _running(pid):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:  # removed by another writer meanwhile, or not ours to remove
            pass
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (encoded with ``encoding``, newlines as given)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (note the argument order, torch's)."""
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))
