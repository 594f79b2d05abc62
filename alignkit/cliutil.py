"""Small command-line helpers shared by ``alignkit``'s commands and the scripts in ``benchmarking/``.

Library modules that register a subcommand or run as a script use these rather than the ``cli``
module, so nothing in the library imports the command line itself.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

from .errors import RunInterrupted, UserError
from .io import unwritable
from .processes import is_main_process

# Under a multi-process launch a user mistake is found by every process and said once, by process 0.
# Another process that finds it first waits this long before saying it too: the launcher ends the
# launch, and this process with it, as soon as process 0 exits, so the line is printed once whichever
# process gets there first, and still printed when only this process found it.
OTHERS_WAIT_S = 20.0


class ArgParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError (one line, exit 2) like every other user mistake, and a flag is
    taken only as written in full (``--no-time`` is not ``--no-timestamp``: an abbreviation could come to mean
    another flag once one is added)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def guarded(fn, *args) -> int:
    """Run ``fn(*args)`` as a command: its int result is the exit code (anything else means 0);
    a UserError becomes one line on stderr and exit code 2 (once under a multi-process launch, see
    :data:`OTHERS_WAIT_S`), a run stopped by a signal its own line and 128 + the signal's number,
    Ctrl-C elsewhere exit code 130; output whose reader went away (``| head``) a quiet 141, as for a
    program stopped by SIGPIPE."""
    try:
        result = fn(*args)
        return result if isinstance(result, int) else 0
    except UserError as exc:
        if not is_main_process():
            time.sleep(OTHERS_WAIT_S)   # process 0 says it, and the launcher stops this one meanwhile
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        if is_main_process():
            print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Nothing more can be written, and Python's flush of stdout at exit would raise again: point it
        # at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low} (got {value})")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1 (``"1,4"`` -> ``[1, 4]``)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return [positive_int(part) for part in parts]


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (NaN and infinities are refused)."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {value:g})")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (NaN and infinities are refused)."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value:g})")
    return value


def output_file(text: str) -> Path:
    """argparse type: a file to write at the end of a run, checked now so a run does not end on a path it
    cannot write. Refused: an empty path, an existing folder, a path whose folder does not exist (it is
    not created) or is a file, and a folder this process cannot write into (see :func:`alignkit.io.unwritable`,
    whose probe file is removed at once). Nothing is left behind."""
    if not text:
        raise argparse.ArgumentTypeError("empty path: give a file name")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give a file name inside it")
    folder = path.parent
    if not folder.exists():
        raise argparse.ArgumentTypeError(f"{text}: folder {folder} does not exist")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {folder} is a file, not a folder")
    problem = unwritable(path)
    if problem:
        raise argparse.ArgumentTypeError(f"{text} cannot be written: {problem}")
    return path


def output_folder(text: str) -> Path:
    """argparse type: a folder to write into (created later, with any missing parents), refused now when it
    is a file or when the nearest existing folder above it cannot be written (see
    :func:`alignkit.io.unwritable`). Nothing is created."""
    if not text:
        raise argparse.ArgumentTypeError("empty path: give a folder")
    problem = unwritable(text, folder=True)
    if problem:
        raise argparse.ArgumentTypeError(f"{text} cannot be written: {problem}")
    return Path(text)


def adapter_folder(text: str) -> str:
    """argparse type: a LoRA adapter folder, checked as :func:`alignkit.adapters.check_adapter_folder` checks
    it (config and safetensors header, not the tensors), so a wrong path is refused before a model loads."""
    from .adapters import check_adapter_folder

    try:
        check_adapter_folder(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
