#!/usr/bin/env bash
# Every GPU check of echo-synth in one run, on a machine with one NVIDIA GPU, in under 8 minutes:
#
#   1. install: virtualenv + pip install -e ".[test]" (falls back to the checkout on PYTHONPATH)
#   2. environment (nvidia-smi, torch, CUDA)          env.json, nvidia-smi.txt
#   3. kernel tests (tests/kernels, pytest)            kernel_tests.xml
#   4. the fused SPADE kernel on CUDA tensors, not interpreted, against the torch reference:
#      forward, backward, fp32/bf16/fp16, and torch.compile(fullgraph=True) through the op
#                                                      kernels_cuda.json
#   5. echo-synth bench --preset paper --models edm-l64,edm-l128,edm, eager (ratios, MFU,
#      Triton vs torch, bf16 vs fp32, MONAI peer)      bench_eager/bench.json
#   6. the same, compiled                              bench_compiled/bench.json
#   7. benchmarks/bench_spade_norm.py (fused kernel vs eager vs compiled)   spade_norm.json
#   8. benchmarks/bench_training.py: bf16 training steps of every paper preset   training.json
#
# Every stage has its own time limit (and the whole run a deadline, GPU_CHECK_BUDGET seconds,
# default 470); a stage that fails or runs out of time is recorded and the next one runs. The
# summary of all stages (exit code, seconds, log) is $OUT/status.json; logs are $OUT/<stage>.log.
#
# Everything ends up in one file, $OUT/gpu_check.json: the environment, every stage's status and
# each stage's own JSON, and first of all the list of what only a GPU can prove (PROVES below).
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --dry-run   # CPU: the plumbing only (tests use it)
#
# --dry-run runs no stage: it records each stage's command, checks that the files it names exist
# and that every embedded Python script compiles, and writes gpu_check.json as a real run would.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "unknown argument $arg (only --dry-run)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${GPU_CHECK_BUDGET:-470}"
VENV="${VENV:-$ROOT/.venv-gpu}"
START=$(date +%s)
STAGES="$OUT/stages.jsonl"
: >"$STAGES"
PY=python3
unset TRITON_INTERPRET ECHO_SYNTH_SPADE_BACKEND || true

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# stage NAME LIMIT_S COMMAND...: run COMMAND under a time limit (cut to the deadline), its output
# in $OUT/NAME.log; record the exit code (124: out of time) and the seconds; never stop the script.
stage() {
  local name=$1 limit=$2
  shift 2
  local left
  left=$(remaining)
  if ((left < 15)); then
    echo "{\"stage\": \"$name\", \"rc\": null, \"seconds\": 0, \"note\": \"skipped: deadline\"}" >>"$STAGES"
    echo "== $name: skipped (deadline)"
    return 0
  fi
  if ((limit > left - 5)); then limit=$((left - 5)); fi
  if ((DRY)); then  # the plumbing: the command and the files it names, nothing run
    local missing=""
    for word in "$@"; do
      case "$word" in
        benchmarks/*|tests/*|"$SCRIPTS"/*) [ -e "$word" ] || missing="$missing $word" ;;
      esac
      case "$word" in
        *.py) [ -e "$word" ] && { "$PY" -m py_compile "$word" || missing="$missing $word(syntax)"; } ;;
      esac
    done
    local rc=0 cmd
    [ -z "$missing" ] || rc=2
    cmd=$(printf '%s ' "$@" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": 0, \"limit_s\": $limit, \"dry_run\": true, \"command\": $cmd, \"missing\": \"${missing# }\"}" >>"$STAGES"
    echo "== $name: dry run (rc $rc)${missing:+ missing:$missing}"
    return 0
  fi
  echo "== $name (limit ${limit} s)"
  local t0 rc=0
  t0=$(date +%s)
  if timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1; then rc=0; else rc=$?; fi
  local dt=$(($(date +%s) - t0))
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"limit_s\": $limit, \"log\": \"$name.log\"}" >>"$STAGES"
  echo "   rc $rc in ${dt} s; last lines:"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /' || true
  return 0
}

# ---------------------------------------------------------------- 1. install
# a virtualenv that sees the machine's packages (torch with CUDA), then the project and its test
# extra; offline, the project alone without its dependencies
INSTALL='[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --retries 0 --timeout 10 -e ".[test]" ||
  "$VENV/bin/python" -m pip install -q --retries 0 --timeout 10 --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import edmcli, echo_synth_kernels, torch; assert torch.cuda.is_available()"'
export VENV
SCRIPTS="$OUT/.scripts"
mkdir -p "$SCRIPTS"
if ((DRY)); then
  PY="${PYTHON:-python3}"
  stage install 120 bash -c "$INSTALL"
elif stage install 120 bash -c "$INSTALL" &&
  "$VENV/bin/python" -c "import edmcli, echo_synth_kernels, torch" >/dev/null 2>&1; then
  PY="$VENV/bin/python"
else  # no installable environment: the checkout itself, kernels/ under its install name
  SHIM="$OUT/.shim"
  mkdir -p "$SHIM"
  ln -sfn "$ROOT/kernels" "$SHIM/echo_synth_kernels"
  export PYTHONPATH="$ROOT:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "{\"stage\": \"install-fallback\", \"rc\": 0, \"seconds\": 0, \"note\": \"using $PY with PYTHONPATH=$PYTHONPATH\"}" >>"$STAGES"
fi
echo "python: $PY"

# ---------------------------------------------------------------- 2. environment
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
cat >"$SCRIPTS/env_info.py" <<'EOF'
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    info |= {"torch": torch.__version__, "cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"device": torch.cuda.get_device_name(0), "memory_bytes": p.total_memory,
                 "capability": list(torch.cuda.get_device_capability(0))}
except Exception as exc:  # no torch yet: the install stage brings it
    info["torch_error"] = repr(exc)
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
EOF
stage env 30 "$PY" "$SCRIPTS/env_info.py" "$OUT/env.json"

# ---------------------------------------------------------------- 3. kernel tests
stage kernel_tests 60 "$PY" -m pytest -q -x -p no:cacheprovider tests/kernels -m "not slow" \
  --junitxml "$OUT/kernel_tests.xml"

# ---------------------------------------------------------------- 4. fused kernel on CUDA
cat >"$SCRIPTS/kernels_cuda.py" <<'EOF'
"""The Triton SPADE group norm on CUDA tensors (compiled kernels, not the interpreter) against
the torch reference in fp64: forward and the three gradients, three dtypes, odd shapes."""
import json, sys
import torch
import echo_synth_kernels as kernels

assert torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cuda")
shapes = [(2, 6, 5, 7, 3), (1, 12, 3, 9, 4), (3, 64, 33, 31, 32), (2, 192, 64, 64, 32),
          (1, 768, 8, 8, 32), (4, 5, 4, 3, 5)]
tol = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}
rows, ok = [], True
for n, c, h, w, g in shapes:
    for dtype in tol:
        for silu in (False, True):
            gen = torch.Generator(device=dev).manual_seed(0)
            x, gamma, beta, dy = (torch.randn(n, c, h, w, device=dev, generator=gen) for _ in range(4))
            x = x * 2 + 0.5
            gamma = gamma * 0.5
            low = [t.to(dtype).requires_grad_() for t in (x, gamma, beta)]
            with kernels.spade_backend("triton"):
                y = kernels.spade_group_norm(*low, g, silu=silu)
            grads = torch.autograd.grad(y, low, dy.to(dtype))
            ref_in = [t.detach().double().requires_grad_() for t in low]
            ref = kernels.spade_group_norm_reference(*ref_in, g, silu=silu)
            ref_grads = torch.autograd.grad(ref, ref_in, dy.to(dtype).double())
            def err(a, b):
                return float(((a.double() - b).abs() / (1 + b.abs())).max())
            errors = [err(y, ref)] + [err(a, b) for a, b in zip(grads, ref_grads)]
            passed = max(errors) <= tol[dtype]
            ok &= passed
            rows.append({"shape": [n, c, h, w], "groups": g, "dtype": str(dtype), "silu": silu,
                         "max_rel_err_y_dx_dgamma_dbeta": errors, "passed": passed})
# torch.compile(fullgraph=True) through the custom op
def f(x, gamma, beta):
    return kernels.spade_group_norm(x, gamma, beta, 32, silu=True) * 2
x, gamma, beta = (torch.randn(2, 64, 16, 16, device=dev, dtype=torch.bfloat16) for _ in range(3))
with kernels.spade_backend("triton"):
    compiled = torch.compile(f, fullgraph=True)(x, gamma, beta)
    eager = f(x, gamma, beta)
compile_err = float((compiled.float() - eager.float()).abs().max())
ok &= compile_err <= 1e-2
result = {"device": torch.cuda.get_device_name(dev), "passed": bool(ok), "rows": rows,
          "compile_fullgraph_max_abs_err": compile_err}
json.dump(result, open(sys.argv[1], "w"), indent=2)
print(f"{sum(r['passed'] for r in rows)}/{len(rows)} cases passed; compiled vs eager {compile_err:.2e}")
sys.exit(0 if ok else 1)
EOF
stage kernels_cuda 45 "$PY" "$SCRIPTS/kernels_cuda.py" "$OUT/kernels_cuda.json"

# ---------------------------------------------------------------- 4b. fallbacks on a real card
cat >"$SCRIPTS/fallback.py" <<'EOF'
"""The fallbacks that keep a first run alive, on a real card: (1) a Triton launch failure under
the auto backend gives the torch path's result exactly, with one warning, and the process stays
on the torch path; (2) a torch.compile failure in sample's denoiser falls back to eager."""
import json, logging, sys
import torch
import echo_synth_kernels as kernels
from echo_synth_kernels import spade_norm_op as op
from edmcli.sampling.compiled import EagerFallback

assert torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cuda")
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("echo_synth_kernels").addHandler(handler)
x, gamma, beta = (torch.randn(4, 256, 64, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
with kernels.spade_backend("torch"):
    expected = kernels.spade_group_norm(x, gamma, beta, 32, silu=True)
with kernels.spade_backend("auto"):
    fused = kernels.spade_group_norm(x, gamma, beta, 32, silu=True)  # the kernels work
    compiled_kernels = op._kernels(False)

    class Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("injected launch failure")
            return launch

    for name in [n for n in vars(compiled_kernels) if n.endswith("_kernel")]:
        setattr(compiled_kernels, name, Failing())
    fallback = kernels.spade_group_norm(x, gamma, beta, 32, silu=True)
    again = kernels.spade_group_norm(x, gamma, beta, 32, silu=True)
triton_ok = bool(torch.equal(fallback, expected) and torch.equal(again, expected)
                 and op._fallback_cause is not None and len(records) == 1)
said = []
net = torch.nn.Conv2d(1, 4, 3, padding=1).to(dev)
def broken(*args, **kwargs):
    raise RuntimeError("injected compile failure")
wrapped = EagerFallback(net, broken, warn=said.append)
inp = torch.randn(2, 1, 32, 32, device=dev)
compile_ok = bool(torch.equal(wrapped(inp), net(inp)) and len(said) == 1)
result = {"triton_launch_fallback_ok": triton_ok, "fallback_cause": op._fallback_cause,
          "warnings": [r.getMessage() for r in records],
          "fused_vs_torch_max_abs": float((fused.float() - expected.float()).abs().max()),
          "compile_fallback_ok": compile_ok, "compile_warning": said}
json.dump(result, open(sys.argv[1], "w"), indent=2)
print(result)
sys.exit(0 if triton_ok and compile_ok else 1)
EOF
stage fallback 40 "$PY" "$SCRIPTS/fallback.py" "$OUT/fallback.json"

# ---------------------------------------------------------------- 4c. memory estimate vs measured
cat >"$SCRIPTS/memory.py" <<'EOF'
"""The batch estimator (edmcli.runs.memory) against torch.cuda.max_memory_allocated: one bf16
training step of EDM at 64² and 128² (tiny preset) at batch 4 and 8, weights, EMA copy and AdamW
moments in place, as train-diffusion runs it."""
import json, sys
from dataclasses import asdict
import torch
from edmcli.data.labels import sector_mask
from edmcli.models.registry import build_loss, loss_settings, precond_settings, unet_config
from edmcli.runs.diffusion_run import DiffusionSettings, build_network
from edmcli.runs.memory import diffusion_training_memory
from edmcli.training.ema import EMA

assert torch.cuda.is_available(), "no CUDA device"
dev, rows = torch.device("cuda"), []
for size in (64, 128):
    precond = precond_settings("edm")
    config = unet_config("edm", "tiny", size, precond=precond)
    settings = DiffusionSettings(model="edm", data="", preset="tiny", image_size=size,
                                 net_size=size, unet=asdict(config), precond=precond)
    estimate = diffusion_training_memory(settings, precision="bf16")
    loss_fn = build_loss("edm", **loss_settings("edm", settings.precond))
    for batch in (4, 8):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        model = build_network(settings).to(dev).train()
        ema = EMA(model, 0.9)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(2):
            image = torch.rand(batch, 1, size, size, device=dev) * 2 - 1
            labels = torch.randint(0, 5, (batch, size, size), device=dev)
            with torch.autocast("cuda", torch.bfloat16):
                loss, _ = loss_fn(model, image, labels, sector_mask(labels))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model, 1)
        measured = torch.cuda.max_memory_allocated(dev)
        predicted = estimate.at(batch)
        rows.append({"size": size, "batch": batch, "measured_bytes": measured,
                     "estimated_bytes": predicted, "ratio": predicted / measured})
        del model, ema, opt
json.dump({"rows": rows}, open(sys.argv[1], "w"), indent=2)
for r in rows:
    print(r)
sys.exit(0 if all(0.7 <= r["ratio"] <= 1.5 for r in rows) else 1)
EOF
stage memory 60 "$PY" "$SCRIPTS/memory.py" "$OUT/memory.json"

# ---------------------------------------------------------------- 5–6. the bench command
MODELS=edm-l64,edm-l128,edm
stage bench_eager 110 "$PY" -m edmcli bench --preset paper --models "$MODELS" --device cuda \
  --no-compile --json --out "$OUT/bench_eager"
stage bench_compiled 110 "$PY" -m edmcli bench --preset paper --models "$MODELS" --device cuda \
  --compile --json --out "$OUT/bench_compiled"
# --json prints the result on stdout: it is in the log; bench.json under --out is the same (and
# holds what was measured so far when a stage ran out of time).

# ---------------------------------------------------------------- 7. fused-kernel benchmark
stage spade_norm 50 "$PY" benchmarks/bench_spade_norm.py --device cuda --reps 10 \
  --json "$OUT/spade_norm.json"

# ---------------------------------------------------------------- 8. training steps
stage training 70 "$PY" benchmarks/bench_training.py --device cuda --preset paper --steps 4 \
  --warmup 2 --json "$OUT/training.json"

# ---------------------------------------------------------------- summary: one JSON
"$PY" - "$STAGES" "$OUT" "$(($(date +%s) - START))" "$DRY" <<'EOF' || cp "$STAGES" "$OUT/status.json"
import json, sys
from pathlib import Path

# What no CPU test can prove, in the order a reader of a first GPU run should check it.
PROVES = [
    "kernels_cuda: the compiled (not interpreted) Triton SPADE norm matches the fp64 reference, "
    "forward and backward, fp32/bf16/fp16, and under torch.compile(fullgraph=True)",
    "fallback: a Triton launch failure and a torch.compile failure fall back to the torch/eager "
    "path with one warning and identical results on a real card",
    "memory: the batch estimator's peak against torch.cuda.max_memory_allocated",
    "bench_eager / bench_compiled: EDM-L64 vs EDM and EDM-L128 images/s ratios at the paper "
    "presets, MFU against the card's peak, Triton vs torch SPADE, bf16 vs fp32, CUDA graphs",
    "spade_norm: fused kernel vs eager vs compiled torch at the paper's shapes",
    "training: bf16 training steps of every paper preset (images/s, peak memory)",
]
stages_file, out = Path(sys.argv[1]), Path(sys.argv[2])
seconds, dry = int(sys.argv[3]), sys.argv[4] == "1"
stages = [json.loads(line) for line in stages_file.read_text().splitlines() if line.strip()]
parts = {"env": "env.json", "kernels_cuda": "kernels_cuda.json", "fallback": "fallback.json",
         "memory": "memory.json", "bench_eager": "bench_eager/bench.json",
         "bench_compiled": "bench_compiled/bench.json", "spade_norm": "spade_norm.json",
         "training": "training.json"}
results = {}
for name, file in parts.items():
    try:
        results[name] = json.loads((out / file).read_text())
    except FileNotFoundError:
        results[name] = None
    except ValueError as exc:
        results[name] = {"unreadable": f"{file}: {exc}"}
summary = {"format": "echo-synth gpu_check 1", "dry_run": dry, "seconds": seconds,
           "all_ok": all(s["rc"] == 0 for s in stages), "proves": PROVES, "stages": stages,
           "results": results}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
status = {k: summary[k] for k in ("seconds", "all_ok", "stages")}
(out / "status.json").write_text(json.dumps(status, indent=2))
for s in stages:
    print(f"{s['stage']:16s} rc {s['rc']}  {s['seconds']:4d} s  {s.get('note', '')}")
print(f"total {seconds} s; all ok: {summary['all_ok']}; everything in {out / 'gpu_check.json'}")
EOF
echo "results under $OUT"
