"""Regenerate docs/kernels-ptxas.md: registers, spills and shared memory of every SPADE-norm
kernel variant the runtime launches for the paper's shapes, on sm_80, sm_86, sm_89 and sm_90, in
fp32, bf16 and fp16, from ptxas's ``-v`` report (no GPU needed; see
``kernels/ptxas_check.py``). Exit status 1 if a variant is over the spill budget or a card's
shared-memory limit.

    python benchmarks/ptxas_table.py [--arch 90] [--ptxas PATH] [--write FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

try:
    from echo_synth_kernels import ptxas_check
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))
    from kernels import ptxas_check

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--write" not in args:
        args += ["--write", str(ROOT / "docs" / "kernels-ptxas.md")]
    sys.exit(ptxas_check.main([*args, "--check"]))
