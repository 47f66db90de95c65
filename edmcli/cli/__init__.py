"""``echo-synth``: the command line. Each command parses its options, calls one stage, prints.

This module holds the Typer app, the order of its commands and the :func:`main` entry point;
the commands live in one module per stage (``data_commands`` … ``pipeline_commands``), the
options they share in :mod:`.options`, and the one-line errors and exit codes in :mod:`.errors`.
"""

from __future__ import annotations

import sys

import typer

from edmcli.console import err_console, quiet_third_party_logs
from edmcli.errors import EchoSynthError

from .bench_commands import bench
from .data_commands import export, info, prepare
from .errors import EXIT_CODES, error_line, user_errors
from .evaluation_commands import evaluate, memorisation
from .pipeline_commands import demo, study
from .sampling_commands import sample
from .training_commands import distill, train_diffusion, train_vae

__all__ = ["EXIT_CODES", "app", "main", "user_errors"]

quiet_third_party_logs()

app = typer.Typer(
    name="echo-synth",
    help="Semantic diffusion models that synthesise echocardiograms from label maps, and the "
    "downstream evaluation of the synthetic data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# The commands, in the order ``echo-synth --help`` lists them (the main path's order).
app.command()(prepare)
app.command()(info)
app.command("train-vae")(train_vae)
app.command("train-diffusion")(train_diffusion)
app.command()(distill)
app.command()(sample)
app.command()(evaluate)
app.command()(memorisation)
app.command()(bench)
app.command()(demo)
app.command()(study)
app.command()(export)


def _usage_message(exc) -> str:
    """Click's message, naming the ``--config`` file and key when the bad value came from it."""
    message = exc.format_message()
    ctx, param = getattr(exc, "ctx", None), getattr(exc, "param", None)
    source = ctx.meta.get("config_file") if ctx is not None else None
    if source and param is not None and param.name in source[1]:
        given = (
            ctx.get_parameter_source(param.name) if hasattr(ctx, "get_parameter_source") else None
        )
        if given is None or "COMMANDLINE" not in str(given):
            message += f" (key {param.name!r} of the --config file {source[0]})"
    return message


def main(argv: list[str] | None = None) -> int:
    """The ``echo-synth`` entry point: every usage mistake (an unknown option, a bad value, a bad
    ``--config`` file) is one ``error:`` line and exit 2, like the commands' own errors;
    :data:`EXIT_CODES` lists the codes."""
    try:  # typer ≥ 0.22 carries its own copy of click
        from typer._click.exceptions import UsageError
    except ImportError:
        from click.exceptions import UsageError

    try:
        code = app(args=argv, standalone_mode=False)
    except UsageError as exc:
        error_line(_usage_message(exc))
        code = 2
    except EchoSynthError as exc:
        error_line(str(exc))
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted", highlight=False)
        code = 130
    code = code if isinstance(code, int) else 0
    if argv is None:
        sys.exit(code)
    return code
