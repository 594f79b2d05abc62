"""The exceptions for mistakes a user can fix (bad path, bad column, bad flag value, bad argument) and for a
run stopped by a signal, and the check of a number the Python API is given."""

from __future__ import annotations

import math
import numbers


class UserError(Exception):
    """A problem with the user's input. The command line prints its message on one line and exits 2."""


class RunInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; the message says how to resume.

    ``exit_code`` is the shell's code for the signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, exit_code: int, resume: str | None = None):
        super().__init__(f"{message}; resume with: {resume}" if resume else message)
        self.stopped, self.exit_code = message, exit_code

    def resumed_by(self, resume: str, before: str = "") -> RunInterrupted:
        """The same stop (``before`` put in front of what stopped), resumed by another command: a driver that
        ran the training (the pipeline) names its own command instead of the training one."""
        return RunInterrupted(before + self.stopped, self.exit_code, resume)


class ArgumentError(UserError, ValueError):
    """A bad argument of the Python API (gyms, agents): a :class:`UserError` whose one line names the argument,
    what was given and what is expected; also a ``ValueError``, which these constructors raised before."""


def checked(name: str, value, low: float = -math.inf, high: float = math.inf, *, whole: bool = False,
            above: bool = False):
    """``value`` of argument ``name`` as an int (``whole``: an int or numpy integer) or a finite float, at least
    ``low`` (more than it with ``above``) and at most ``high``; anything else (a bool, a string, NaN, 2.5 or
    even 2.0 where a whole number is wanted) is an :class:`ArgumentError`."""
    kind = numbers.Integral if whole else numbers.Real
    number = math.nan   # fails every comparison below
    if isinstance(value, kind) and not isinstance(value, bool):
        number = int(value) if whole else float(value)
    if not ((number > low if above else number >= low) and number <= high and -math.inf < number < math.inf):
        bounds = [f"{'>' if above else '>='} {low:g}"] if low > -math.inf else []
        bounds += [f"<= {high:g}"] if high < math.inf else []
        what = f"{'a whole number' if whole else 'a number'} {' and '.join(bounds)}" if bounds else "a finite number"
        raise ArgumentError(f"{name} must be {what} (got {value!r})")
    return number


def check_accelerator(accelerator, uses: str = "prepare") -> None:
    """An :class:`ArgumentError` unless ``accelerator`` is None or an ``accelerate.Accelerator`` (anything with
    the attribute ``uses`` it is read for): a device name such as ``"cpu"`` is not one."""
    if accelerator is not None and not hasattr(accelerator, uses):
        raise ArgumentError(f"accelerator must be an accelerate.Accelerator or None (got {accelerator!r}); the "
                            "device is the model's: load_model(device=...)")
