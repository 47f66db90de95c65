"""Registers, spills and shared memory of every SPADE-norm kernel variant the runtime launches,
from ptxas's own ``-v`` report, for each CUDA card generation. No GPU needed.

For the paper's activation shapes (:data:`PAPER_BATCHES` × :data:`PAPER_RESOLUTIONS` ×
:data:`PAPER_CHANNELS`, :data:`PAPER_GROUPS` groups) and the SM counts of the cards of each
architecture (:data:`CARDS`), :func:`variants_for` asks the launch heuristics of
:mod:`kernels.spade_norm_triton` (``launch_variants``, the code the launchers use) which kernel
variants (kernel, dtype, SiLU, BLOCK, num_warps, SPLIT_P2) they pick. :func:`report` compiles each
with Triton for ``sm_<arch>`` (as the runtime does: same constexprs, 16-byte aligned pointers),
runs ptxas ``-v`` on the PTX with the flags Triton's own ptxas call uses, and reads registers,
spill stores/loads, stack frame and static shared memory from its report; the shared memory a
launch requests is the static part plus Triton's dynamic ``metadata.shared``.

A variant fails (:meth:`PtxasReport.problems`) when it spills more than :data:`SPILL_BUDGET` bytes
or needs more shared memory per block than the card's opt-in limit (:data:`SMEM_PER_BLOCK`).

    python benchmarks/ptxas_table.py            # writes docs/kernels-ptxas.md
    python -m echo_synth_kernels.ptxas_check --check   # exit status 1 on a failing variant
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from . import spade_norm_triton as tri

#: CUDA architectures checked (compute capability × 10)
ARCHS: tuple[int, ...] = (80, 86, 89, 90)
#: cards of each architecture and their SM counts: the launch heuristics depend on the SM count
CARDS: dict[int, dict[str, int]] = {
    80: {"A100": 108, "A30": 56},
    86: {"RTX A6000 / A40": 84, "RTX 3090": 82, "A10": 72, "RTX 3060": 28},
    89: {"L40S / L40": 142, "RTX 4090": 128, "L4": 58, "RTX 4060": 24},
    90: {"H100 SXM / H200": 132, "H100 PCIe": 114, "H20": 78},
}
#: shared memory per SM and the per-block opt-in maximum, bytes (CUDA programming guide)
SMEM_PER_SM: dict[int, int] = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
SMEM_PER_BLOCK: dict[int, int] = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
#: bytes of spill stores plus spill loads allowed per variant
SPILL_BUDGET = 0
#: data dtypes checked (x, gamma, beta alike): the training dtypes, which accumulate in fp32, and
#: fp64, which the fused path accepts too (gradient checks) and accumulates in fp64
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: the paper's SPADE-normalised activations
PAPER_BATCHES: tuple[int, ...] = tuple(range(1, 65))
PAPER_RESOLUTIONS: tuple[int, ...] = (64, 128, 256)
PAPER_CHANNELS: tuple[int, ...] = (64, 128, 192, 256, 384, 512)
PAPER_GROUPS = 32
#: configurations outside the paper's shapes, measured for comparison (not checked): the fp64
#: one-program kernels at 8192 elements × 16 warps, which the heuristics no longer pick (the
#: backward spills), and at 4096 × 8 warps, which fp64 groups of 2049-4096 elements still take
COMPARED: dict[tri.Variant, str] = {
    **{
        tri.Variant(kernel, "fp64", silu, 8192, 16): "no longer launched"
        for kernel in ("_fwd_single_kernel", "_bwd_single_kernel")
        for silu in (False, True)
    },
    **{
        tri.Variant(kernel, "fp64", silu, 4096, 8): "fp64 groups of 2049-4096"
        for kernel in ("_fwd_single_kernel", "_bwd_single_kernel")
        for silu in (False, True)
    },
}


def paper_groups() -> list[tuple[int, int]]:
    """``(N·G, (C/G)·H·W)`` of every paper shape: what the launch heuristics see."""
    return sorted(
        {
            (n * PAPER_GROUPS, c // PAPER_GROUPS * r * r)
            for n in PAPER_BATCHES
            for r in PAPER_RESOLUTIONS
            for c in PAPER_CHANNELS
        }
    )


def variants_for(arch: int, dtypes: Sequence[torch.dtype] = DTYPES) -> list[tri.Variant]:
    """The variants the runtime launches for the paper's shapes on any card of ``arch``."""
    found: set[tri.Variant] = set()
    for sm_count in CARDS[arch].values():
        found |= tri.launch_variants(paper_groups(), sm_count, dtypes)
    return sorted(found, key=_sort_key)


def _sort_key(v: tri.Variant) -> tuple:
    return (tri.KERNEL_NAMES.index(v.kernel), v.block, v.num_warps, v.split_p2, v.silu, v.dtype)


@dataclasses.dataclass(frozen=True)
class PtxasReport:
    """What ptxas ``-v`` said of one variant for one architecture (sizes in bytes)."""

    arch: int
    variant: tri.Variant
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    static_smem: int
    dynamic_smem: int  # Triton's metadata.shared: requested at launch
    vector_load: bool  # the PTX has 128-bit global loads (ld.global.v4)
    vector_store: bool  # ... and stores (st.global.v4)
    launched: bool = True  # False: a COMPARED configuration, not checked

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def smem(self) -> int:
        return self.static_smem + self.dynamic_smem

    def problems(self) -> list[str]:
        """Why this variant is out of budget or over the card's limits (empty: fine)."""
        found = []
        where = f"sm_{self.arch} {self.variant.name}"
        if self.spill_bytes > SPILL_BUDGET:
            found.append(
                f"{where}: {self.spill_stores} B spill stores + {self.spill_loads} B spill loads "
                f"> budget {SPILL_BUDGET} B"
            )
        if self.smem > SMEM_PER_BLOCK[self.arch]:
            found.append(
                f"{where}: {self.smem} B shared memory > {SMEM_PER_BLOCK[self.arch]} B per block"
            )
        threads = 32 * self.variant.num_warps
        if self.registers * threads > 65536:
            found.append(f"{where}: {self.registers} registers × {threads} threads > 64 Ki")
        return found


_FUNCTION_PROPERTIES = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_USED = re.compile(r"Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, int]:
    """registers, spill_stores, spill_loads, stack_frame, static_smem of the one entry function
    that a ptxas ``-v`` log describes."""
    props = _FUNCTION_PROPERTIES.findall(log)
    used = _USED.findall(log)
    if len(props) != 1 or len(used) != 1:
        raise ValueError(f"Expected one function in the ptxas report, got:\n{log}")
    stack, stores, loads = (int(v) for v in props[0])
    smem = _SMEM.search(used[0][1])
    return {
        "registers": int(used[0][0]),
        "spill_stores": int(stores),
        "spill_loads": int(loads),
        "stack_frame": stack,
        "static_smem": int(smem.group(1)) if smem else 0,
    }


def ptxas_path() -> str:
    """The ptxas Triton itself runs (its bundled one, or ``TRITON_PTXAS_PATH``)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError):  # older Triton: its knob, else the one on PATH
        try:
            import triton

            return triton.knobs.nvidia.ptxas.path
        except AttributeError:
            found = shutil.which("ptxas")
            if found is None:
                raise RuntimeError("No ptxas found (neither Triton's nor on PATH).") from None
            return found


def ptxas_version(ptxas: str) -> str:
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return match.group(2) if match else out.strip().splitlines()[-1]


def _gpu_name(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # as Triton's sm_arch_from_capability


def run_ptxas(ptx: str, arch: int, ptxas: str, workdir: Path, stem: str) -> str:
    """ptxas ``-v`` on ``ptx`` with Triton's flags (``-lineinfo -v --regAllocOptLevel=2``, its
    default optimisation level); returns the report (stderr)."""
    src = workdir / f"{stem}.ptx"
    src.write_text(ptx)
    cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={_gpu_name(arch)}"]
    proc = subprocess.run(
        [*cmd, str(src), "-o", str(workdir / f"{stem}.cubin")],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {stem} (sm_{arch}):\n{proc.stderr}")
    return proc.stderr


def report(
    archs: Iterable[int] = ARCHS,
    dtypes: Sequence[torch.dtype] = DTYPES,
    ptxas: str | None = None,
    jobs: int = 2,
    compared: Iterable[tri.Variant] = (),
) -> list[PtxasReport]:
    """Compile every variant of :func:`variants_for` for each arch (and the ``compared`` ones,
    reported with ``launched=False``) and read ptxas's report.

    Triton compiles in this process (its cache makes reruns fast); the ptxas runs go to
    ``jobs`` threads meanwhile.
    """
    ptxas = ptxas or ptxas_path()
    kernels = tri.build(interpret=False)
    reports: list[PtxasReport] = []
    with (
        tempfile.TemporaryDirectory(prefix="spade-ptxas-") as tmp,
        concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool,
    ):
        pending = []
        for arch in archs:
            todo = [(v, True) for v in variants_for(arch, dtypes)] + [(v, False) for v in compared]
            for i, (variant, launched) in enumerate(todo):
                compiled = kernels.compile(variant, arch)
                ptx = compiled.asm["ptx"]
                future = pool.submit(run_ptxas, ptx, arch, ptxas, Path(tmp), f"{arch}-{i}")
                extra = {
                    "dynamic_smem": int(compiled.metadata.shared),
                    "vector_load": "ld.global.v4" in ptx or "ld.global.v2.b64" in ptx,
                    "vector_store": "st.global.v4" in ptx or "st.global.v2.b64" in ptx,
                    "launched": launched,
                }
                pending.append((arch, variant, extra, future))
        for arch, variant, extra, future in pending:
            reports.append(PtxasReport(arch, variant, **parse_ptxas_log(future.result()), **extra))
    return reports


# ----------------------------------------------------------------------------------------------
# the table


def _kib(n: int) -> str:
    return f"{n / 1024:g} KiB"


def _max_registers(reports: Iterable[PtxasReport], kernel: str, block: int) -> int | str:
    found = [
        r.registers
        for r in reports
        if r.variant.kernel == kernel and r.variant.block == block and r.variant.dtype != "fp64"
    ]
    return max(found) if found else "?"


def _cell(r: PtxasReport | None) -> str:
    return "" if r is None else f"{r.registers} / {r.spill_bytes} / {r.smem}"


def render_markdown(reports: Sequence[PtxasReport], ptxas_label: str) -> str:
    """docs/kernels-ptxas.md: how it was made, the budget and limits, a summary per arch and
    dtype, one table per arch (rows: variants, columns: dtypes), and the compared
    configurations."""
    import triton

    launched = [r for r in reports if r.launched]
    compared = [r for r in reports if not r.launched]
    dtype_names = [tri._TL_NAMES[d] for d in DTYPES]
    archs = sorted({r.arch for r in launched})
    problems = [p for r in launched for p in r.problems()]
    groups = paper_groups()
    lines = [
        "# SPADE-norm kernels: registers, spills and shared memory per card",
        "",
        "<!-- generated by benchmarks/ptxas_table.py (kernels/ptxas_check.py); do not edit -->",
        "",
        "Every variant of the fused SPADE group-norm kernels (`kernels/spade_norm_triton.py`) that",
        "the runtime launches for the paper's activation shapes, compiled without a GPU for each",
        "card generation and measured by ptxas's own `-v` report. Regenerate with",
        "`python benchmarks/ptxas_table.py` (about 2.5 minutes on two cores with an empty Triton",
        "cache, exit status 1 if a variant is over budget). The slow test",
        "`test_every_launch_variant_fits_every_card` (`tests/kernels/test_kernels_spade_norm.py`)",
        "runs the same check and fails on a variant over budget; the fast test",
        "`test_ptxas_doc_lists_the_variants_the_heuristics_pick` fails when the heuristics change",
        "and this file was not regenerated.",
        "",
        "## How it is produced",
        "",
        f"- Shapes: batch {PAPER_BATCHES[0]}–{PAPER_BATCHES[-1]} (every value), "
        + ", ".join(f"{r}²" for r in PAPER_RESOLUTIONS)
        + ", channels "
        + ", ".join(map(str, PAPER_CHANNELS))
        + f", {PAPER_GROUPS} groups: groups of {min(g[1] for g in groups)}–"
        f"{max(g[1] for g in groups)} elements, {min(g[0] for g in groups)}–"
        f"{max(g[0] for g in groups)} groups per launch.",
        "- Variants: the (kernel, dtype, SiLU, BLOCK, num_warps, SPLIT_P2) combinations that the",
        "  launch heuristics (`spade_norm_triton.launch_variants`, which the launchers' own",
        "  `_plan` drives) pick for those shapes, forward and backward, with and without SiLU, at",
        "  the SM counts of these cards (the split heuristics depend on the SM count): "
        + "; ".join(
            f"sm_{a}: " + ", ".join(f"{n} ({c} SMs)" for n, c in CARDS[a].items()) for a in archs
        )
        + ".",
        "- dtypes: " + ", ".join(dtype_names) + " (x, γ, β alike). fp32, bf16 and fp16",
        "  accumulate in fp32; fp64, which the fused path also accepts (gradient checks),",
        "  accumulates in fp64.",
        f"- Compiled by Triton {triton.__version__} for `sm_<arch>` (`sm_90a` for 90, as Triton",
        "  does) with the runtime's specialisation (16-byte aligned pointers, group length",
        f"  divisible by 16); ptxas {ptxas_label} then run on the PTX with Triton's flags",
        "  (`-lineinfo -v --regAllocOptLevel=2`, default optimisation level).",
        "- Registers, spill stores and spill loads are ptxas's. Shared memory is what a launch",
        "  requests: ptxas's static `smem` (0 for every variant) plus Triton's dynamic",
        "  `metadata.shared` (the cross-warp reduction scratch).",
        "",
        "## Budget and limits",
        "",
        "A variant beyond any of these is a test failure.",
        "",
        f"- Spills: {SPILL_BUDGET} bytes (stores + loads). The kernels stream every element once",
        "  or twice and are bandwidth-bound; a spill adds local-memory traffic per element, and",
        "  every launched variant fits in registers, so none is allowed.",
        "- Shared memory per block (opt-in maximum): "
        + ", ".join(
            f"sm_{a} {_kib(SMEM_PER_BLOCK[a])} (per SM {_kib(SMEM_PER_SM[a])})" for a in archs
        )
        + ".",
        "- Registers × threads ≤ 64 Ki per block (ptxas enforces it through `.reqntid`: at 16",
        "  warps a thread may use 128 registers, at 8 warps 255).",
        "",
        f"Result: {len(launched)} variant compilations, {len(problems)} over budget or limit"
        + (": " + "; ".join(problems) if problems else "")
        + ".",
        "",
        "## Findings",
        "",
        "- The one-program-per-group backward at 8192 elements × 16 warps (16 elements a thread,",
        "  at most 128 registers) does not spill in fp32, bf16 or fp16: at most "
        f"{_max_registers(launched, '_bwd_single_kernel', 8192)} registers on "
        + ", ".join(f"sm_{a}" for a in archs)
        + ".",
        "- In fp64 it spills (last table), so fp64 groups of more than 4096 elements take the",
        "  looping or split kernels (BLOCK ≤ 2048, no spills, fp64 column above); fp64 groups up",
        "  to 4096 keep the one-program kernels (4096 × 8 warps: at most 255 registers, no spills,",
        "  last table). fp32, bf16 and fp16 launch exactly as before.",
        "",
        "## Summary",
        "",
        "| arch | dtype | variants | registers, max (variant) | spill bytes | shared memory, max |",
        "|---|---|---:|---|---:|---:|",
    ]
    for arch in archs:
        for name in dtype_names:
            rows = [r for r in launched if r.arch == arch and r.variant.dtype == name]
            if not rows:
                continue
            top = max(rows, key=lambda r: r.registers)
            lines.append(
                f"| sm_{arch} | {name} | {len(rows)} | {top.registers} (`{top.variant.name}`) | "
                f"{sum(r.spill_bytes for r in rows)} | {max(r.smem for r in rows)} B |"
            )
    lines += [
        "",
        "## Per variant",
        "",
        "Cells: registers / spill bytes (stores + loads) / shared memory bytes per block; empty:",
        "not launched in that dtype. SPLIT_P2: partials merged by the split apply kernels",
        "(their number padded to a power of two).",
    ]
    for arch in archs:
        lines += [
            "",
            f"### sm_{arch}",
            "",
            "| kernel | SiLU | BLOCK | warps | SPLIT_P2 | " + " | ".join(dtype_names) + " |",
            "|---|---|---:|---:|---:|" + "---|" * len(dtype_names),
        ]
        cells: dict[tuple, dict[str, PtxasReport]] = {}
        for r in launched:
            if r.arch == arch:
                v = r.variant
                key = (v.kernel, v.silu, v.block, v.num_warps, v.split_p2)
                cells.setdefault(key, {})[v.dtype] = r
        order = sorted(cells, key=lambda k: (tri.KERNEL_NAMES.index(k[0]), *k[2:], k[1]))
        for key in order:
            kernel, silu, block, warps, split_p2 = key
            silu_text = "–" if kernel == "_fwd_stats_kernel" else ("yes" if silu else "no")
            row = [f"`{kernel}`", silu_text, str(block), str(warps), str(split_p2 or "–")]
            row += [_cell(cells[key].get(name)) for name in dtype_names]
            lines.append("| " + " | ".join(row) + " |")
    if compared:
        lines += [
            "",
            "## fp64 one-program kernels outside the paper's shapes (for comparison, not checked)",
            "",
            "Cells: registers, spill stores / spill loads, stack frame (local memory per thread).",
            "",
            "| variant | launched | " + " | ".join(f"sm_{a}" for a in archs) + " |",
            "|---|---|" + "---|" * len(archs),
        ]
        for variant in dict.fromkeys(r.variant for r in compared):
            row = [f"`{variant.name}`", COMPARED.get(variant, "")]
            for arch in archs:
                r = next((r for r in compared if r.arch == arch and r.variant == variant), None)
                row.append(
                    ""
                    if r is None
                    else f"{r.registers}, {r.spill_stores} / {r.spill_loads} B, {r.stack_frame} B"
                )
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="write the Markdown table to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 if a variant fails")
    parser.add_argument("--arch", type=int, action="append", help="only these (e.g. 90)")
    parser.add_argument("--ptxas", help="ptxas to run (default: Triton's own)")
    parser.add_argument("--jobs", type=int, default=2, help="ptxas processes at once")
    args = parser.parse_args(argv)
    ptxas = args.ptxas or ptxas_path()
    start = time.perf_counter()
    reports = report(args.arch or ARCHS, ptxas=ptxas, jobs=args.jobs, compared=COMPARED)
    seconds = time.perf_counter() - start
    label = f"{ptxas_version(ptxas)} (`{Path(ptxas).name}`"
    label += ", Triton's bundled one)" if "triton" in ptxas else f", {ptxas})"
    text = render_markdown(reports, label)
    if args.write:
        args.write.write_text(text)
        print(f"wrote {args.write} ({len(reports)} variants, {seconds:.0f} s)")
    else:
        print(text)
    problems = [p for r in reports if r.launched for p in r.problems()]
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
