"""An exclusive lock per cache entry, so that two processes never compute one value twice.

Two runs that share a cache (different ``--out``, one ``$SPECCORE_CACHE``) may need the same
adapter or scores at the same time. Each computes an entry only while holding that entry's
lock; the other waits, then finds the entry in the cache and reuses it. Locks are POSIX
``flock`` locks on a small file per entry: the kernel releases them when a process ends, however
it ends, so a killed run never leaves a stale lock. Where ``fcntl`` does not exist (Windows) the
block runs unlocked, as before.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from . import interrupt
from .io import make_dirs

logger = logging.getLogger(__name__)

#: How often a waiting process retries the lock (and checks for a stop signal).
POLL_SECONDS = 0.2


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block.

    If another process holds it, say once that this one waits for it (``what`` names the
    value), and wait; a stop signal (SIGTERM, Ctrl-C) ends the wait like any other work.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    make_dirs(path.parent)
    with open(path, "a+b") as handle:
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    logger.info("waiting for another speccore process computing %s", what)
                    waited = True
                interrupt.check()
                time.sleep(POLL_SECONDS)
        if waited:
            logger.info("%s: the other process is done", what)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
