"""Fused kernels of echo-synth. Imports nothing of ``edmcli``.

:func:`spade_group_norm` is the SPADE normalisation ``GroupNorm(x)·(1+γ)+β`` (then SiLU if
asked): a fused Triton custom op on CUDA, the torch reference :func:`spade_group_norm_reference`
elsewhere. :func:`set_spade_backend` / :func:`spade_backend` or the environment variable
``ECHO_SYNTH_SPADE_BACKEND`` (``auto``, ``triton``, ``torch``) force a path. Triton itself is only
imported when a kernel first runs. Under ``auto`` a failure of the fused kernels (import, compile,
launch) falls back to torch for the rest of the process with one logged warning line; ``triton``
raises instead. ``ptxas_check`` (not imported here) reports registers, spills and shared memory
of every kernel variant per CUDA architecture without a GPU (docs/kernels-ptxas.md).
"""

from .reference import spade_group_norm_reference
from .spade_norm_op import (
    BACKENDS,
    ENV_BACKEND,
    TRITON_AVAILABLE,
    get_spade_backend,
    set_spade_backend,
    spade_backend,
    spade_group_norm,
)

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "TRITON_AVAILABLE",
    "get_spade_backend",
    "set_spade_backend",
    "spade_backend",
    "spade_group_norm",
    "spade_group_norm_reference",
]
