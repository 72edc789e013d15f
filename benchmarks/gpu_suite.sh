#!/usr/bin/env bash
# The GPU checks that the CPU-only CI cannot do, in phases that each fit one 10-minute device call.
#
#   bash benchmarks/gpu_suite.sh kernels       # full-size Triton tests + offline compile report
#   bash benchmarks/gpu_suite.sh contrastive   # bench_contrastive, N = 4,096 .. 262,144, every impl
#   bash benchmarks/gpu_suite.sh contrastive-1m  # N = 524,288 and 1,048,576 (naive is long out of memory)
#   bash benchmarks/gpu_suite.sh optimize      # bench_optimize up to N = 1,048,576 (1M images/min target)
#   bash benchmarks/gpu_suite.sh stages        # bench_embed / bench_retrieve / bench_train (gan, ldm) on CUDA
#   bash benchmarks/gpu_suite.sh compile       # whole gan and ldm runs, eager vs --compile inductor (bench_ddp)
#
# Logs and the CSVs under benchmarks/results/ are copied to $OUT (default /tmp/gpu-suite) so that a
# device call brings them back; record them in BENCHMARKS.md with the device, date and commit.
# On the lent device machine (Python with torch and triton, no network), with wheels fetched here by
# ../shared/scripts/gpu-wheels.sh .whl and `.whl` carried, start the command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_suite.sh kernels
set -uo pipefail
out=${OUT:-/tmp/gpu-suite}
mkdir -p "$out"
phase=${1:?usage: gpu_suite.sh kernels|contrastive|contrastive-1m|optimize|stages|compile}
log="$out/$phase.log"
export PYTHONUNBUFFERED=1

run() {  # run SECONDS CMD...: a time-limited step whose output goes to the log and the screen
    local limit=$1; shift
    echo "+ $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "exit ${PIPESTATUS[0]}" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"; } | tee -a "$log"
case "$phase" in
    kernels)
        run 120 python -m kernels.compile_check --dims 512,768
        run 120 python -m kernels.self_check   # the first-use verdict on this device, and its cost
        run 420 python -m pytest tests/kernels -q -p no:cacheprovider -rs
        ;;
    contrastive)
        run 560 python benchmarks/bench_contrastive.py --device cuda --time-budget 20 \
            --sizes 4096,8192,16384,32768,65536,131072,262144
        ;;
    contrastive-1m)
        run 560 python benchmarks/bench_contrastive.py --device cuda --time-budget 30 \
            --sizes 524288,1048576 --impls triton,chunked
        ;;
    optimize)
        run 560 python benchmarks/bench_optimize.py --device cuda --n 65536,262144,1048576
        ;;
    stages)
        run 150 python benchmarks/bench_embed.py --device cuda --model ViT-B-32 --n-images 20000 \
            --workers 16 --batch-size 512 --image-size 224 --source-size 256
        run 200 python benchmarks/bench_retrieve.py --device cuda
        run 100 python benchmarks/bench_train.py --device cuda --size small
        run 100 python benchmarks/bench_train.py --model ldm --device cuda --size S --resolution 64
        ;;
    compile)
        for model_size in gan:small ldm:S; do
            for backend in "" inductor; do
                run 140 python benchmarks/bench_ddp.py --device cuda --model "${model_size%%:*}" \
                    --size "${model_size##*:}" --resolution 64 --images 4096 --batch-size 64 --steps 300 \
                    --nproc 1 ${backend:+--compile $backend}
            done
        done
        ;;
    *)
        echo "unknown phase: $phase" >&2
        exit 2
        ;;
esac
cp benchmarks/results/*.csv "$out/" 2>/dev/null
ls "$out"
