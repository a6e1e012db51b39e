"""Atomic writes: every file the library writes is written whole or not at all (docs/design.md, section 3).

:func:`atomic_write` writes a temp file ``.{name}.{host}.{pid}.XXXXXXXX.tmp`` beside the destination,
and renames it onto the destination when complete. A writer killed mid-write (SIGKILL, power loss)
leaves its temp file behind; the next write to the same path deletes it once its writer (same host)
is no longer running, and deletes temp files of older dkgm_aug versions (no pid in the name) after
an hour. The file formats written this way are in :data:`dkgm_aug.checkpoint.FORMATS`.
"""
import os
import re
import socket
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from safetensors import SafetensorError

from .errors import CheckpointError

OLD_TEMP_AGE_S = 3600
# The writer's host in temp names, without dots so that the name splits unambiguously.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
# What follows ".{name}." in a temp name: "{host}.{pid}." (absent in older versions), then
# mkstemp's 8 random characters and ".tmp".
_TEMP_TAIL = re.compile(r"^(?:([A-Za-z0-9-]+)\.(\d{1,10})\.)?[a-z0-9_]{8}\.tmp$")


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``: readers never see half a file.

    OS and safetensors errors (a full disk, a read-only folder) raise CheckpointError naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.",
                                   suffix=".tmp")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"could not write {path}: {_cause(exc)}; {path.name} is unchanged "
                              "(the write is all or nothing)") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _remove_stale_temps(path: Path) -> None:
    """Delete the temp files that writers of ``path`` killed mid-write left beside it (best effort)."""
    prefix = f".{path.name}."
    try:
        with os.scandir(path.parent) as entries:
            tails = [e.name[len(prefix):] for e in entries if e.name.startswith(prefix)]
    except OSError:          # an unlistable folder: nothing to clean, and the write may still work
        return
    for tail in tails:
        file = path.parent / (prefix + tail)
        with suppress(OSError):    # removed by another writer meanwhile, or not ours to remove
            if _is_stale(file, tail):
                file.unlink()


def _is_stale(file: Path, tail: str) -> bool:
    match = _TEMP_TAIL.match(tail)
    if match is None:
        return False
    host, pid = match.groups()
    if host is None:        # written by an older version: no writer to ask, so go by age
        return time.time() - file.stat().st_mtime > OLD_TEMP_AGE_S
    return host == _HOST and not _running(int(pid))


def _running(pid: int) -> bool:
    if os.name == "nt":     # os.kill(pid, 0) would interrupt the process there, not probe it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):   # another user's process, or not a pid at all: leave it
        return True
    return True


def _cause(exc) -> str:
    """An OS error's reason without its file name (a temp file's, or the one already named)."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
