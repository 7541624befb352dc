#!/usr/bin/env bash
# GPU check, prepared for a CUDA machine with PyTorch and no network (step limits add up to 4 min 50 s).
#
#   bash bench/gpu_check.sh              # from the repository root, in the project's environment
#   bash bench/gpu_check.sh --cpu-only   # only the parts that run without a GPU (syntax, CPU parity)
#
# Steps (each under its own timeout, so the whole stays under 5 minutes; a failing step is reported and the
# next one still runs; the exit status is 1 if any step failed):
#   1. syntax of the bench scripts; parity of the CPU engines against _ref (bench/gpu_parity.py --device cpu)
#   2. pytest -m gpu (the gpu-marked tests: kernels, ssd, mixer on CUDA)
#   3. parity of the torch GPU scan and SSD (and mamba-ssm's, when it imports) against _ref, with timings
#   4. timings on mamba-130m and mamba2-130m presets (random init, no hub access): influence
#      (--seq-len 512 --samples 2), smooth (--seq-len 1024 --samples 1) and one needle cell (2k tokens)
# Output: the console, and a log per step under ${OUT:-/tmp/ssmdiag-gpu-check}/ (result.json of each run).
set -u
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/ssmdiag-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
failed=0

step() {  # step NAME SECONDS CMD...: run with a timeout, log to $OUT/NAME.log, keep going on failure
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${secs}s): $*"
  if timeout "$secs" "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0))s)"
  else
    echo "   FAILED (status $?, $((SECONDS - t0))s); last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
    failed=1
  fi
  grep -E '^(ok|FAIL|skip) |^\| ' "$OUT/$name.log" | sed 's/^/   /' || true
}

echo "host: $(hostname)  $(date -u +%FT%TZ)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
$PY - <<'EOF'
import torch
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
EOF

step syntax 10 $PY -c "import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]" bench/scan.py bench/mamba2.py \
  bench/influence.py bench/smooth.py bench/needle_cell.py bench/gpu_parity.py
step syntax_sh 10 bash -n bench/gpu_check.sh
step parity_cpu 60 $PY bench/gpu_parity.py --device cpu --length 64

if [ "${1:-}" = "--cpu-only" ] || ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device (or --cpu-only): skipping the GPU steps"
  exit $failed
fi

step pytest_gpu 60 $PY -m pytest -q -p no:cacheprovider -m gpu --basetemp="$OUT/pytest" tests
step parity_gpu 40 $PY bench/gpu_parity.py --device cuda --length 512
step influence 50 ssmdiag influence mamba-130m mamba2-130m --init random --seq-len 512 --samples 2 --device cuda \
  --out "$OUT/runs" --quiet
step smooth 40 ssmdiag smooth mamba-130m mamba2-130m --init random --seq-len 1024 --samples 1 --device cuda \
  --out "$OUT/runs" --quiet
step needle 40 $PY bench/needle_cell.py --length 2k -- --device cuda

# the timings each run recorded (seconds; result.json timings_s)
$PY - "$OUT/runs" <<'EOF'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/*/*/result.json")):
    r = json.load(open(path))
    print(f"   {r['command']:<9} backend {r.get('backend')}: " + ", ".join(
        f"{k} {v:.1f}" for k, v in r.get("timings_s", {}).items() if isinstance(v, (int, float))))
EOF
exit $failed
