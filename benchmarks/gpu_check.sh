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
#   OUT=gpu_out bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
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
stage install 120 bash -c "$INSTALL"
if "$VENV/bin/python" -c "import edmcli, echo_synth_kernels, torch" >/dev/null 2>&1; then
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
SCRIPTS="$OUT/.scripts"
mkdir -p "$SCRIPTS"
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

# ---------------------------------------------------------------- summary
"$PY" - "$STAGES" "$OUT/status.json" "$(($(date +%s) - START))" <<'EOF' || cp "$STAGES" "$OUT/status.json"
import json, sys
stages = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
summary = {"seconds": int(sys.argv[3]), "all_ok": all(s["rc"] == 0 for s in stages),
           "stages": stages}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
for s in stages:
    print(f"{s['stage']:16s} rc {s['rc']}  {s['seconds']:4d} s  {s.get('note', '')}")
print(f"total {summary['seconds']} s; all ok: {summary['all_ok']}")
EOF
echo "results under $OUT"
