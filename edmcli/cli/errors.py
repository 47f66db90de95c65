"""How a command fails: one ``error:`` line on stderr and an exit code (:data:`EXIT_CODES`), and
the :func:`user_errors` wrapper that every command runs inside (it also applies ``--threads``)."""

from __future__ import annotations

import errno
import functools
import inspect
from pathlib import Path

import typer

from edmcli.console import err_console
from edmcli.errors import EchoSynthError

from .options import ThreadsOpt

EXIT_CODES = {
    0: "ok",
    1: "a failure of the tool (a bug: please report it)",
    2: "bad input or a refused command (one line on stderr says which)",
    130: "interrupted (Ctrl-C / SIGTERM; a checkpoint was written, rerun resumes)",
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
            return fn(*args, **kwargs)
        except EchoSynthError as exc:
            error_line(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            error_line(os_error_message(exc, kwargs.get("out") or kwargs.get("run")))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    signature = inspect.signature(fn, eval_str=True)
    extra = inspect.Parameter(
        "threads", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ThreadsOpt
    )
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    wrapper.__annotations__ = {**fn.__annotations__, "threads": ThreadsOpt}
    return wrapper


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
