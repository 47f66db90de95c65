"""How a command fails: one ``error:`` line on stderr and an exit code (:data:`EXIT_CODES`), and
the :func:`user_errors` wrapper that every command runs inside (it also applies ``--threads``)."""

from __future__ import annotations

import functools
import inspect

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
            error_line(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
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


def _set_threads(threads: int | None) -> None:
    from edmcli.threads import configure_threads

    plan = configure_threads(threads)
    if plan.warning:
        err_console.print(f"warning: {plan.warning}", highlight=False, markup=False)


def error_line(message: str) -> None:
    """``error: MESSAGE`` on stderr, the message printed as it is (no rich markup)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
