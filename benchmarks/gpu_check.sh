#!/usr/bin/env bash
# GPU check (issue 15): run on a machine with a CUDA GPU, from the repository root.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results/gpu_check
#
# 1. the test suite with CUDA visible (tests with device "auto" run on the GPU; CUDA-only tests run);
# 2. the default config (fashion-vgg-firefly) trained on CUDA with bf16 autocast and its growth schedule;
# 3. images/s and peak torch.cuda.max_memory_allocated for training and for one growth step
#    (benchmarks/train_profile.py), in fp32 and bf16;
# 4. the paper's VGG-19/CIFAR-10-shaped growth-cost preset on CUDA (benchmarks/growth_cost.py --preset paper-vgg19).
# With 2+ GPUs it also trains the default config with `--nproc 2` (DDP over nccl).
#
# Exits 1 at once with one line when no CUDA GPU is usable. Record its numbers in benchmarks/README.md only
# after actually running it.
set -euo pipefail

OUT="${1:-benchmarks/results/gpu_check}"
PY="${PYTHON:-python}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)' 2>/dev/null; then
    echo "error: gpu_check.sh needs a CUDA GPU, and torch.cuda.is_available() is False here; run it on a GPU machine" >&2
    exit 1
fi
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
say() { echo "== $*" | tee -a "$LOG"; }

say "GPU: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)') ($NGPU visible)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee -a "$LOG" || true

say "1/4 test suite with CUDA visible"
"$PY" -m pytest -q -x 2>&1 | tee "$OUT/pytest.log" | tail -n 5 | tee -a "$LOG"

say "2/4 default config on CUDA, bf16, with growth"
rm -rf "$OUT/default-bf16"
firefly train fashion-vgg-firefly --set train.device=cuda --set train.precision=bf16 \
    --out "$OUT/default-bf16" --no-progress 2>&1 | tee "$OUT/default-bf16.log" | tail -n 3 | tee -a "$LOG"
if [ "$NGPU" -ge 2 ]; then
    say "2b/4 default config, 2 processes (DDP over nccl), bf16"
    rm -rf "$OUT/default-bf16-ddp2"
    firefly train fashion-vgg-firefly --nproc 2 --set train.device=cuda --set train.precision=bf16 \
        --out "$OUT/default-bf16-ddp2" --no-progress 2>&1 | tail -n 3 | tee -a "$LOG"
fi

say "3/4 images/s and peak memory: training epoch and one growth step"
for prec in fp32 bf16; do
    "$PY" benchmarks/train_profile.py fashion-vgg-firefly --set train.device=cuda --set "train.precision=$prec" \
        --set train.tensorboard=false --out "$OUT/train_profile_$prec.json" >/dev/null
    "$PY" - "$OUT/train_profile_$prec.json" <<'EOF' | tee -a "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"
print(f"{r['precision']}: train {r['train_images_per_s']:.0f} images/s, peak {mib(r['train_peak_bytes'])}; "
      f"one {r['growth_method']} growth {r['growth_s']:.2f}s, peak {mib(r['growth_peak_bytes'])} "
      f"({r['params_before_growth']:,} -> {r['params_after_growth']:,} params) on {r['gpu']}")
EOF
done

say "4/4 paper VGG-19 growth-cost preset on CUDA"
"$PY" benchmarks/growth_cost.py --preset paper-vgg19 --out "$OUT/growth_cost_paper-vgg19_cuda.json" 2>&1 \
    | tail -n 20 | tee -a "$LOG"

say "done: results in $OUT (summary in $LOG)"
