#!/usr/bin/env bash
# Checks one GPU machine in about ten minutes: the GPU-only tests natively, then the decode
# benchmarks whose figures the README's "Benchmarks" section reports.
#
#   pip install -e . "jax[cuda12]" pytest && bash scripts/gpu_check.sh [OUT_DIR]
#   CLM=1 bash scripts/gpu_check.sh        # and the 1B training step's MFU (5 more minutes)
#
# 1. tests that only a GPU runs: the Pallas (Triton) and cuDNN attention kernels against the
#    dense reference, the decode-attention kernel and the decode-product kernel
#    (models/decode_gemm.py) compiled by Triton and run;
# 2. `benchmark generate` on the 1B model (bfloat16, 32 prompts of 64 tokens, 128 new):
#    the GPU's default decode step (layers unrolled, q/k/v and gate/up joined, the decode
#    kernel) with its products by cuBLAS and by the Pallas kernel (`--decode_gemm pallas`),
#    each with bfloat16 and int8 sampling weights, and the scanned step;
# 3. `scripts.gemm_check`: each 1B decode product alone, cuBLAS / XLA's Triton GEMMs against
#    the Pallas kernel in several tilings (which one to make the default);
# 4. one line per generate run: decode step time and memory-bandwidth utilisation, and for
#    the first two the kernels of one traced call by GPU time (scripts/trace_summary.py);
# 5. with CLM=1, `benchmark clm` on the 1B model (bfloat16, 16 x 2048 tokens, full remat)
#    with the Pallas attention kernel and with cuDNN's: tokens/s and MFU against the chip's
#    peak and the matmul rate measured beside it.
# Each run has its own time limit, so one that hangs cannot take the rest with it; each
# benchmark's full output and JSON line are kept in OUT_DIR (default: gpu_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
start=$(date +%s)
stage() { echo "=== [$(( $(date +%s) - start )) s] $*"; }

stage "devices"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1

stage "GPU-only tests"
# The Pallas GPU kernel natively (values and gradients, float32 and bfloat16), cuDNN, and the
# decode kernel compiled by Triton; XLA_FLAGS empty, since the tests' conftest would ask for 8
# host devices, which a GPU run does not need.
XLA_FLAGS= timeout 240 python -m pytest -q -rfEs -p no:cacheprovider \
  tests/models/test_attention_kernels.py tests/models/test_decode_attention.py \
  tests/models/test_decode_gemm.py \
  -k "pallas_gpu or cudnn or natively" 2>&1 | tail -25 | tee "$out/tests.log"

bench() {  # name, then benchmark arguments
  local name=$1; shift
  stage "generate $name"
  timeout 150 python -m scripts.benchmark generate --preset 1b --dtype bfloat16 --prompts 32 \
    --repeats 3 "$@" > "$out/generate_$name.log" 2>&1
  local rc=$?
  grep -E "^(decode step|bandwidth util|compile)" "$out/generate_$name.log"
  [ $rc -eq 0 ] || { echo "generate $name: exit $rc"; tail -5 "$out/generate_$name.log"; }
}
gemm() {  # weights, variants
  stage "gemm_check $1"
  timeout 150 python -m scripts.gemm_check --preset 1b --rows 32 --weights $1 \
    --variants $2 > "$out/gemm_$1.log" 2>&1 || tail -5 "$out/gemm_$1.log"
  sed -n '/^decode step/,/^{/p' "$out/gemm_$1.log" | grep -v '^{'
}
# Most telling first: a run cut short by the device's time still leaves these.
profile() {  # name: where that run's traced call spent the GPU's time
  timeout 60 python -m scripts.trace_summary "$out/trace_$1" --top 12 --families \
    > "$out/trace_$1.txt" 2>&1; grep -v '^{' "$out/trace_$1.txt" | head -14
}
bench default --profile "$out/trace_default"
profile default
bench pallas --decode_gemm pallas --profile "$out/trace_pallas"
profile pallas
gemm compute plan,no_split,n16_k256,n32_k256,n128,warps8
bench int8 --sample_weights int8
bench int8_pallas --sample_weights int8 --decode_gemm pallas
gemm int8 plan,no_split,warps8
bench scan --decode_layers scan

if [ "${CLM:-0}" = 1 ]; then
  for attention in auto cudnn; do  # the Pallas kernel (auto), cuDNN's (rows of one document)
    stage "clm 1b, attention $attention"
    timeout 200 python -m scripts.benchmark clm --preset 1b --dtype bfloat16 --batch 16 \
      --remat full --steps 6 --warmup 1 --attention $attention > "$out/clm_$attention.log" 2>&1
    grep -E "^(step time|tokens/s|model FLOP/s|peak|MFU)" "$out/clm_$attention.log" \
      || tail -5 "$out/clm_$attention.log"
  done
fi

stage "summary"
python - "$out" <<'EOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "generate_*.log"))):
  lines = [l for l in open(path) if l.startswith("{")]
  if not lines:
    print(f"{os.path.basename(path)[9:-4]:12s} no result")
    continue
  r = json.loads(lines[-1])
  print(f"{os.path.basename(path)[9:-4]:12s} {r['decode_layers']:8s} {r['weights']:8s} "
        f"{r.get('gemm', 'xla'):6s} "
        f"step {r['decode_step_s'] * 1e3:.3f} ms  {r['decode_step_bytes'] / 2**30:.2f} GiB  "
        f"{100 * r['bandwidth_utilisation']:.1f}% of {r['memory_bandwidth'] / 1e12:.2f} TB/s "
        f"({r['bandwidth_source']})")
EOF
stage "done"
