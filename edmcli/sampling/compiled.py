"""The ``torch.compile``d denoiser of ``sample`` and ``bench``, with a fallback that never ends a
run: compiling happens at the first call (and again at a new batch shape), so a failure there (no
C compiler for inductor's CPU backend, a Triton without a compiler for the card, a CUDA-graph
capture error) is caught, the same call is made eagerly, one warning line names the cause, and
the rest of the process stays eager. An error that the eager network raises too is the inputs'
and is raised as it is. ``--no-compile`` remains the explicit switch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def compiled_network(net: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` the network (on CUDA with "reduce-overhead": CUDA graphs; the σ
    schedule is precomputed and the loop never syncs, so graphs replay). No fallback: ``bench``
    times exactly this and reports a failure as that entry's error."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(net, mode=mode, dynamic=False)


def compile_denoiser(net: nn.Module, device: torch.device) -> nn.Module:
    """:func:`compiled_network` wrapped in :class:`EagerFallback`: what ``sample`` runs."""
    return EagerFallback(net, compiled_network(net, device))


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The exception's type and the first line of its message (inductor's run to pages)."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _warning_line(text: str) -> None:
    from edmcli.console import err_console

    err_console.print(f"warning: {text}", highlight=False)


class EagerFallback(nn.Module):
    """Call ``compiled``; when it raises, call ``net`` with the same arguments, warn once and
    stay eager. Attributes the solvers read (``spade_cache``, ``round_sigma``, σ bounds) come
    from ``net``."""

    def __init__(
        self,
        net: nn.Module,
        compiled: Callable[..., Any],
        warn: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self._compiled: Callable[..., Any] | None = compiled
        self._warn = warn or _warning_line
        self.fallback_reason: str | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            return self.net(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as exc:  # compiling or a compiled call failed: try the eager network
            out = self.net(*args, **kwargs)  # an error here is the inputs', raised as it is
            self._compiled = None
            self.fallback_reason = first_line(exc)
            self._warn(
                f"torch.compile failed ({self.fallback_reason}); the denoiser runs eagerly for "
                "the rest of this process (--no-compile skips compiling)"
            )
            return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["net"], name)
