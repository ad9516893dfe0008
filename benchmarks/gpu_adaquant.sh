#!/usr/bin/env bash
# AdaQuant on one GPU, the device check in one script (about 8.5 minutes on one H100 before the block reconstruction check, which adds up to 4),
# the speed goals first:
#   speed: W4A4, full defaults (1000 iterations, mini-batch 50), 512 images, on torchvision
#          ResNet-50 (random weights) and zoo:mobilenet_v2; then the plain reference-shaped
#          loop vs grouped vs one layer at a time (30 iterations);
#   quality: zoo:mobilenet_v2, 256 calibration images, W4A4: RTN vs sequential AdaQuant
#            (full defaults: Fisher-weighted loss); then block reconstruction with QDrop
#            at 1000 iterations per unit (new: not yet run on a GPU, limited to 4 minutes).
# Needs data/bench-photos (make photos). Usage: benchmarks/gpu_adaquant.sh [OUTDIR]
set -u
out=${1:-benchmarks/results}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
run() { local limit=$1; shift; timeout "$limit" "$py" "$@" 2>>"$out/stderr.log" || echo "exit $? (limit ${limit}s): $*"; }
run 45 benchmarks/check_cuda.py
run 100 benchmarks/bench_adaquant.py --device cuda --model torchvision:resnet50 --samples 512 --iters 1000 \
    --schedules grouped --json "$out/gpu_speed_resnet50.json"
run 80 benchmarks/bench_adaquant.py --device cuda --model zoo:mobilenet_v2 --samples 512 --iters 1000 \
    --schedules grouped --json "$out/gpu_speed_mobilenet_v2.json"
run 45 benchmarks/bench_adaquant.py --device cuda --model zoo:mobilenet_v2 --samples 512 --iters 30 \
    --schedules plain,grouped,one --json "$out/gpu_schedules_mobilenet_v2.json"
run 240 benchmarks/bench_adaquant_quality.py --device cuda --samples 256 --iters 1000 \
    --bits W4A4 --methods rtn,sequential \
    --json "$out/gpu_quality.json"
run 240 benchmarks/bench_reconstruct.py --device cuda --bits W4A4 --configs block+qdrop \
    --iters 1000 --json "$out/gpu_reconstruct.json"
tail -c 3000 "$out/stderr.log"
