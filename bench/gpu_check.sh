#!/usr/bin/env bash
# The GPU check, for a session that is lent a CUDA machine (CuPy, pytest and hypothesis
# installed there, no internet): the whole test suite with CuPy as the default device,
# a per-op profile of one training step of the CPU preset's model on the GPU, and, where
# there are 2 GPUs, 20 steps of train.py on 2 ranks over NCCL (mpiexec -n 2).
#   bash bench/gpu_check.sh        (about 5 minutes; run it with a 9-minute limit)
set -u
cd "$(dirname "$0")/.."
export TINYGRAD_LITE_DEVICE=cuda
python -c "import cupy; print('cupy', cupy.__version__, '|', cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())"
python -c "from tinygrad_lite import backend; assert backend.cuda_available, 'CuPy did not load'; print('tinygrad_lite default device:', backend.default_device())"
echo "== test suite on cuda (the SIGKILL crash test runs the CLI on the CPU, left out) =="
timeout 400 python -m pytest -q -p no:cacheprovider --ignore=tests/test_crash.py -x 2>&1 | tail -25
echo "== one training step, per op, on cuda =="
timeout 120 python bench/op_profile.py --steps 20 2>&1 | tail -20
echo "== 2 GPUs: train.py on 2 ranks over NCCL =="
GPUS=$(python -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())")
if [ "$GPUS" -lt 2 ]; then
    echo "skipped: fewer than 2 GPUs here ($GPUS); NCCL refuses two ranks on one device"
elif ! command -v mpiexec >/dev/null || ! python -c "import mpi4py" 2>/dev/null; then
    echo "skipped: mpiexec or mpi4py missing (pip install 'tinygrad_lite[mpi]')"
else
    timeout 180 mpiexec -n 2 python train.py --device cuda --max-iters 20 --eval-interval 10 --eval-iters 2 \
        --out-dir /tmp/out-nccl --no-progress 2>&1 | tail -6
fi
