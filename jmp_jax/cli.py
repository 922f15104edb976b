"""What every command-line entry point shares: a quiet start-up and failures as one line.

    from jmp_jax import cli
    cli.quiet_startup()  # first: TensorFlow and XLA read their log levels when they load
    ...
    if __name__ == "__main__":
        cli.run(main)       # argparse entry points
        cli.run_absl(main)  # absl entry points (flags parsed by absl.app)

A failure prints `error: <cause>` on one line (the project's errors name the file, step or key) and exits
with status 1; JMP_JAX_TRACEBACK=1 shows the full traceback instead.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Any, Callable, NoReturn

TRACEBACK_ENV = "JMP_JAX_TRACEBACK"

# Libraries whose start-up banners, deprecation notes and INFO/WARNING logs are noise to a user.
_QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", "GRPC_VERBOSITY": "ERROR",
              "GLOG_minloglevel": "2"}
# Raised with a message meant for the user; anything else may be a bug, worth its traceback.
_USER_ERRORS = (ValueError, OSError, RuntimeError)
_QUIET_WARNINGS = r"(tensorflow|tensorstore|orbax|absl|flax|jax|keras|google|tf_keras)(\.|$)"


def quiet_startup() -> None:
    """Silences TensorFlow / XLA / absl / orbax banners and warnings; the project's own output is untouched.

    Environment settings are defaults (a user's own setting wins); they only act if set before TensorFlow
    and jaxlib load, so entry points call this before their other imports.
    """
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", module=_QUIET_WARNINGS)
    for name in ("absl", "jax", "orbax", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sys.unraisablehook = functools.partial(_drop_closed_loop_reports, sys.unraisablehook)


def _drop_closed_loop_reports(hook: Callable[[Any], None], unraisable: Any) -> None:
    """After a failed orbax read, its other pending reads report "Event loop is closed" when collected:
    noise after an error already reported in one line. Anything else goes to `hook`."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        hook(unraisable)


def one_line(err: BaseException) -> str:
    """The error's message on one line (later lines joined by '; '); errors whose message means little without
    it (KeyError: 'x') keep their type name."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    message = lines[0] if len(lines) == 1 else f"{lines[0]} {'; '.join(lines[1:])}"
    if isinstance(err, (KeyError, IndexError, TypeError, AttributeError, AssertionError)):
        return f"{type(err).__name__}: {message}"
    return message


def one_line_errors(main: Callable[..., Any], passthrough: tuple[type[Exception], ...] = ()) -> Callable[..., Any]:
    """Wraps an entry point: an exception becomes `error: <cause>` on stderr and exit status 1 (Ctrl-C: 130).

    passthrough: exceptions left to the caller (absl.app prints the usage for its UsageError).
    """

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except passthrough:
            raise
        except KeyboardInterrupt:
            if os.environ.get(TRACEBACK_ENV):
                raise
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as err:  # noqa: BLE001 (the whole point: no traceback for a user)
            if os.environ.get(TRACEBACK_ENV):
                raise
            hint = "" if isinstance(err, _USER_ERRORS) else f" (set {TRACEBACK_ENV}=1 for the traceback)"
            print(f"error: {one_line(err)}{hint}", file=sys.stderr)
            sys.exit(1)

    return guarded


def run(main: Callable[[], Any]) -> NoReturn:
    """Runs an argparse entry point: its int return value is the exit status (anything else: 0)."""
    result = one_line_errors(main)()
    sys.exit(result if isinstance(result, int) else 0)


def run_absl(main: Callable[[list[str]], Any]) -> NoReturn:
    """Runs an absl.app entry point with one-line errors; absl's own log shows errors only unless --verbosity
    is given (absl.app sets the level from that flag after quiet_startup ran)."""
    from absl import app, flags
    from absl import logging as absl_logging

    def quiet_main(argv):
        if not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.ERROR)
        return main(argv)

    app.run(one_line_errors(quiet_main, passthrough=(app.UsageError,)))
