"""How a command fails: one ``error:`` line on stderr and an exit code (:data:`EXIT_CODES`), and
the :func:`user_errors` wrapper that every command runs inside (it also applies ``--threads``)."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import signal
from pathlib import Path

import typer

from edmcli.console import err_console
from edmcli.errors import EchoSynthError

from .options import ThreadsOpt

EXIT_CODES = {
    0: "ok",
    1: "a failure of the tool (a bug: please report it)",
    2: "bad input or a refused command (one line on stderr says which)",
    130: "interrupted (SIGINT / SIGTERM; what was written completely is kept, rerun continues)",
}


def user_errors(fn):
    """Turn EchoSynthError (and a file-system refusal: permission, a file where a folder is
    needed, a full disk) into one line on stderr and exit code 2; Ctrl-C into exit 130.

    Every command so wrapped also takes ``--threads N`` (:func:`edmcli.threads.configure_threads`
    runs before the command's work)."""

    @functools.wraps(fn)
    def wrapper(*args, threads: int | None = None, **kwargs):
        try:
            _set_threads(threads)
            with stop_signals():
                return fn(*args, **kwargs)
        except EchoSynthError as exc:
            error_line(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            error_line(os_error_message(exc, kwargs.get("out") or kwargs.get("run")))
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            by = f" by {exc.args[0]}" if exc.args else ""
            error_line(f"interrupted{by}; rerun the same command to continue")
            raise typer.Exit(130) from None

    signature = inspect.signature(fn, eval_str=True)
    extra = inspect.Parameter(
        "threads", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ThreadsOpt
    )
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    wrapper.__annotations__ = {**fn.__annotations__, "threads": ThreadsOpt}
    return wrapper


@contextlib.contextmanager
def stop_signals():
    """SIGINT and SIGTERM stop the command as Ctrl-C does (KeyboardInterrupt, exit 130), also
    when it was started with SIGINT ignored (``cmd &`` in a script) or under a scheduler that
    sends SIGTERM: what was written completely stays, the rerun continues. Training installs
    its own handlers inside (a checkpoint first) and restores these."""

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (a test runner's worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def os_error_message(exc: OSError, target=None) -> str:
    """One sentence for a file-system refusal, naming the path: the file the error names, else
    the command's output (``target``: its ``--out``/``--run``)."""
    name = exc.filename
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = name or target
        place = f" while writing {where}" if where else ""
        return (
            f"no space left on the device{place}; free space and rerun the same command "
            "(what was written completely is kept and resumed from)"
        )
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and name and Path(name).is_file():
        return f"{name} is a file, not a folder; choose an output path inside folders"
    if name:
        return f"{exc.strerror or exc}: {name}"
    return str(exc)


def _set_threads(threads: int | None) -> None:
    from edmcli.threads import configure_threads

    plan = configure_threads(threads)
    if plan.warning:
        err_console.print(f"warning: {plan.warning}", highlight=False, markup=False)


def error_line(message: str) -> None:
    """``error: MESSAGE`` on stderr, the message printed as it is (no rich markup)."""
    from rich.text import Text

    err_console.print(Text.assemble(("error:", "bold red"), f" {message}"), highlight=False)
