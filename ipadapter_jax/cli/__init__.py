"""What every command-line entry point shares: user errors as one line.

``run(prog, main, argv)`` calls ``main(argv)``; a ``UserError`` (bad
argument, bad or missing file, unsupported model or option, incompatible
combination, non-finite result) is printed as ``PROG: error: MESSAGE`` on
stderr with exit status 2, as argparse does for its own errors. Anything else
is a bug and keeps its traceback. ``--debug`` on the command line or
``IPADAPTER_JAX_DEBUG=1`` in the environment shows the traceback of user
errors too.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn, Sequence

from ipadapter_jax.cli import interrupts
from ipadapter_jax.io.errors import UserError

DEBUG_ENV = "IPADAPTER_JAX_DEBUG"


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among the arguments, or the debug environment variable set."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def one_line(message: str) -> str:
    """A message as one line (multi-line messages are joined with ' | ')."""
    return " | ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
        signals: bool = True) -> int:
    """Run ``main(argv)`` and turn user errors into one line and exit status 2.
    Run as a command (``argv`` None) with ``signals``, Ctrl-C or SIGTERM at any
    moment ends it at once with one line, exit status 130 / 143 and no partial
    file (``cli.interrupts``)."""
    if argv is None and signals:
        interrupts.exit_on_signals(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv) or 0
    except UserError as e:
        if debug_requested(argv):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def checked(parser: argparse.ArgumentParser, argv: Sequence[str] | None, check: Callable[[], None]) -> None:
    """Run a command's argument checks: a ``UserError`` is the parser's one-line
    error (folders the checks made are removed), or with ``--debug`` its traceback."""
    from ipadapter_jax.cli.checks import undo_created_folders

    try:
        check()
    except UserError as e:
        undo_created_folders()
        if debug_requested(argv if argv is not None else sys.argv[1:]):
            raise
        parser.error(str(e))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors as one line, ``PROG: error: MESSAGE`` and exit status
    2: never the usage block (the flags of these commands fill a screen; ``--help``
    shows them)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")
