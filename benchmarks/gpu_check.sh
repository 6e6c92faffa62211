#!/usr/bin/env bash
# benchmarks/gpu_check.sh - one short GPU session: every paper preset starts and trains a few optimizer steps on
# synthetic images (recipe line, accumulation, finite loss), then the device-only step speed at the paper sizes,
# eager and compiled beside the plain classifiers, the top kernels of each step, the input pipelines on generated
# JPEGs with 12 loader workers, and --decode device (nvjpeg).
#   bash benchmarks/gpu_check.sh            # writes logs to $OUT (default out/gpu_check)
# The presets run at --global-batch 256 (accumulation 4 at per-GPU batch 64) so that a step takes seconds; their
# batch warning is expected. Paper hours are projected from the speed rows, never from these smoke runs.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT" /tmp/gpu_check
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    | tee -a "$OUT/device.txt"

S="--data synthetic --batch-size 64 --global-batch 256 --epochs 4 --warmup-epochs 0 --log-every 1 --workers 12"
preset() {   # name, file, args...: keep the recipe line, the warnings, the last progress lines and any error
    local name=$1; shift
    echo "=== $name: python $*"
    timeout 90 python "$@" --out "/tmp/gpu_check/$name" > "$OUT/$name.log" 2>&1
    echo "exit $?"
    grep -E "^recipe|paper row|^warning: global|error|Error" "$OUT/$name.log" | head -n 4
    grep -E "^ep " "$OUT/$name.log" | tail -n 2
}
preset conmim_vit_base conmim.py --preset vit_base_300ep $S
preset conmim_vit_large conmim.py --preset vit_large_1600ep $S
preset correlate_vit_base cim_correlate.py --preset vit_base_300ep $S
preset corrupt_vit_base cim_corrupt.py --preset vit_base_300ep --tokenizer random $S
preset corrupt_resnet50 cim_corrupt.py --preset resnet50_300ep --tokenizer random $S

SPEED="python benchmarks/speed.py --device cuda --arch vit_base --img-size 224 --batch-size 64 --iters 10"
echo "=== device-only step speed, bf16 eager, paper sizes (224 px, per-GPU batch 64), top 12 kernels per row"
timeout 300 $SPEED --profile 12 2>&1 | grep -v "^WARNING: --tokenizer random" | tee "$OUT/speed_eager.txt"
echo "=== the same, torch.compile"
timeout 600 $SPEED --compile 2>&1 | grep -v "^WARNING: --tokenizer random" | tee "$OUT/speed_compile.txt"
echo "=== input pipelines on 512 generated ImageNet-sized JPEGs, 12 workers; --decode device on the GPU"
timeout 240 python benchmarks/speed.py --loader --jpegs 512 --workers 12 --device cuda --out /tmp/gpu_check \
    2>&1 | tee "$OUT/loader.txt"
