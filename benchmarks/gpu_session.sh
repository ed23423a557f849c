#!/usr/bin/env bash
# The GPU runs that settle the open switches, each one device call of under 10 minutes (kept in the repo
# because ignored helper scripts do not survive between sessions). Run from the repository root:
#
#   bash benchmarks/gpu_session.sh decisions  # GPU tests of the untimed paths; large-m parts at 4096->14336 K4;
#                                             # A/B of TRELLM_OVERLAP=1 and TRELLM_LARGE_M=effective (decode,
#                                             # prefill) on the 8B-shape model (written to /tmp/e2e/m first)
#   bash benchmarks/gpu_session.sh quick      # its first two steps only (~4 min)
#   bash benchmarks/gpu_session.sh parts      # bench_gemm --parts: both large-m paths, 3 shapes x K 2/4/6
#   bash benchmarks/gpu_session.sh bf16       # needs /tmp/e2e/m: ATTN_ROTATE A/B, step phases, then bf16
#
# Output goes to stdout and, where $OUT is set (the device tool), to $OUT/log.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
[ -n "${OUT:-}" ] && exec > >(tee "$OUT/log") 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader

write_model() {  # the 8B-shape EXL3 model, in the background (bench_e2e would write the same)
  [ -f /tmp/e2e/m/config.json ] && { echo "model written"; return; }
  timeout 300 python -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from bench_e2e import PRESETS
from trellm.quant.exl3_writer import write_random_exl3_model
write_random_exl3_model(PRESETS['llama3-8b'], Path('/tmp/e2e/m'), bits=4, head_bits=6, shard_bytes=4 * 2**30)
print('model written')"
}

case "${1:-}" in
decisions)
  write_model > /tmp/write.log 2>&1 &
  timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_generator.py \
    tests/kernels/test_fused.py tests/kernels/test_exl3_kernels.py tests/quant/test_exl3_linear.py \
    -k "overlap or rotat or effective or large_batches or graph_logits or combine" 2>&1 | tail -12
  TRELLM_LARGE_M=effective timeout 100 python benchmarks/bench_gemm.py --shapes 4096x14336 --bits 4 \
    --m 512,4096 --parts --check 2>&1 | tail -12
  timeout 240 bash -c "until grep -q 'model written' /tmp/write.log; do sleep 2; done"; tail -2 /tmp/write.log
  timeout 330 python benchmarks/bench_e2e.py --out /tmp/e2e/m --batches 1,16 --new 128 --rounds 1 \
    --variants "base|TRELLM_OVERLAP=1|TRELLM_LARGE_M=effective|TRELLM_LARGE_M=effective,TRELLM_LARGE_M_OVERLAP=4" \
    2>&1 | grep -v '^{"round"' | tail -6
  ;;
quick)  # ~4 min: the GPU tests of the untimed paths and the large-m parts at 4096->14336 K4
  timeout 110 python -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_generator.py \
    tests/kernels/test_fused.py tests/kernels/test_exl3_kernels.py tests/quant/test_exl3_linear.py \
    -k "overlap or rotat or effective or large_batches or graph_logits or combine" 2>&1 | tail -12
  TRELLM_LARGE_M=effective timeout 100 python benchmarks/bench_gemm.py --shapes 4096x14336 --bits 4 \
    --m 512,4096 --parts --check 2>&1 | tail -12
  ;;
parts)
  TRELLM_LARGE_M=effective timeout 500 python benchmarks/bench_gemm.py --shapes 4096x14336,14336x4096,4096x4096 \
    --bits 2,4,6 --m 512,4096 --parts --check 2>&1 | tail -45
  ;;
bf16)
  [ -f /tmp/e2e/m/config.json ] || echo "no /tmp/e2e/m: a fresh machine, bench_e2e writes the model first"
  timeout 200 python benchmarks/bench_e2e.py --out /tmp/e2e/m --batches 1,16 --new 256 --rounds 2 \
    --variants "TRELLM_OVERLAP=1|TRELLM_OVERLAP=1,TRELLM_ATTN_ROTATE=0" 2>&1 | grep -v '^{"round"' | tail -5
  TRELLM_OVERLAP=1 timeout 120 python benchmarks/profile_decode.py --out /tmp/e2e/m --batches 1,16 --split \
    --top 12 2>&1 | tail -50
  rm -rf /tmp/e2e/m  # room for the 16 GB bf16 model
  TRELLM_OVERLAP=1 timeout 250 python benchmarks/bench_e2e.py --out /tmp/e2e/bf16 --format bf16 --batches 1,16 \
    --prefill 2048 2>&1 | tail -7
  ;;
*)
  echo "usage: bash benchmarks/gpu_session.sh decisions|quick|parts|bf16" >&2
  exit 2
  ;;
esac
