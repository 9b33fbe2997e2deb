"""The one writer of every file a run leaves: a temporary file renamed over the target, so an interrupted write never
looks complete; the next writer removes those of dead writers (by host and pid), not a parallel writer's."""

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)
STALE_AFTER_S = 24 * 3600  # a writer that has not touched its file for a day is gone, wherever it ran
HOST = socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: Path, stem: str) -> None:
    """Remove `folder/.STEM.HOST.PID.*.tmp` files of dead writers (this host) or a day old (any host)."""
    for path in folder.glob(f".{stem}.*.tmp"):
        host, _, pid = path.name[len(stem) + 2 : -4].rpartition(".")[0].rpartition(".")
        try:
            dead = host == HOST and pid.isdigit() and not _alive(int(pid))
            if dead or time.time() - path.stat().st_mtime > STALE_AFTER_S:
                path.unlink()
                log.info("removed %s, left by an interrupted write", path)
        except OSError:  # removed meanwhile by another writer, or not ours to remove
            continue


def write_atomically(
    target: Path, content: bytes | str | Callable[[BinaryIO], object], stem: str | None = None
) -> None:
    """Write `content` (bytes, text, or a function given the open file) to `target`; `stem` names the temp files."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stem = stem or target.name
    remove_stale_temps(target.parent, stem)
    tmp = target.parent / f".{stem}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:  # not mkstemp: its files get 0600, not the usual 0666 less the umask
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power loss leaves the old file or the new one
        os.replace(tmp, target)
    except BaseException:  # also Ctrl-C: leave nothing behind that we can remove now
        tmp.unlink(missing_ok=True)
        raise
