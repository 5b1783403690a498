"""Ctrl-C and SIGTERM at any moment of a command: one line, exit 130 / 143,
no partial file.

Python runs signal handlers in the main thread between bytecodes, so a
Ctrl-C during an XLA compilation (C++, minutes at full size) waits for it,
and raising ``KeyboardInterrupt`` then can crash the interpreter's exit while
XLA's threads still run. Instead ``exit_on_signals`` blocks SIGINT and SIGTERM
in every thread (threads started later, XLA's among them, inherit the mask)
and one waiting thread takes them: it removes the files registered as being
written, prints ``PROG: interrupted``, and ends the process at once
(``os._exit``: nothing of the interpreter's teardown runs).
Outputs are written atomically (``io.files.atomic_write``: a temporary file
renamed into place, listed in ``io.files.IN_PROGRESS`` while it exists), so an
interrupted write leaves at most that temporary file, which is removed here.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_partial: set[Path] = set()
_lock = threading.Lock()
_waiter: threading.Thread | None = None


def writing(path: str | os.PathLike) -> None:
    """``path`` is being written: remove it if the command is interrupted."""
    with _lock:
        _partial.add(Path(path))


def written(path: str | os.PathLike) -> None:
    """``path`` is complete (or gone)."""
    with _lock:
        _partial.discard(Path(path))


def _wait(prog: str) -> None:
    signum = signal.sigwait(_SIGNALS)
    # Imported here, not at the top: numpy (which io.files loads) starts OpenBLAS threads, and any thread
    # started before the mask is set would take the signals itself.
    from ipadapter_jax.io import files

    with _lock:
        for path in [*_partial, *list(files.IN_PROGRESS)]:
            try:
                path.unlink()
            except OSError:
                pass
    name = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
    os.write(sys.stderr.fileno(), f"\n{prog}: {name}\n".encode())
    os._exit(128 + signum)


def exit_on_signals(prog: str) -> None:
    """From now on SIGINT / SIGTERM end the process as the module docstring says.
    Call it before any thread starts (JAX's, numpy's OpenBLAS pool): a thread
    that existed before keeps the signals unblocked and would take them."""
    global _waiter
    if _waiter is not None or not hasattr(signal, "pthread_sigmask"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    _waiter = threading.Thread(target=_wait, args=(prog,), name="signals", daemon=True)
    _waiter.start()
