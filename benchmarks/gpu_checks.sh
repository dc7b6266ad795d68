#!/usr/bin/env bash
# The GPU checks in one run, for a session lent a GPU machine (docs/benchmarks.md, "GPU"):
# the expert grouped GEMM, NCCL + FSDP2 through torchrun, and the 1B bf16 run (compiled layers,
# flex attention over packed documents, fused AdamW). Wheels the machine lacks travel in .whl/.
#   bash benchmarks/gpu_checks.sh            # figures also under $OUT when set
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site $(ls .whl/*.whl | grep -v pyarrow)
    python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" ||
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/pyarrow-*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ATTUNE_CACHE=/tmp/acache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, torch.cuda.get_device_name())"

echo "== grouped GEMM (Qwen3-30B-A3B expert shapes, bf16, forward + backward)"
timeout 120 python3 benchmarks/grouped_gemm.py 2>&1 | tee "$OUT/grouped_gemm.txt"

echo "== NCCL + FSDP2: full_finetune_distributed on one GPU through torchrun, bf16"
timeout 150 python3 -m attune run --nproc_per_node 1 full_finetune_distributed --config tiny/full \
    device=cuda dtype=bf16 max_steps=40 output_dir=/tmp/nccl answer_check=null 2>&1 |
    tail -4 | tee "$OUT/nccl.txt"

echo "== Llama-3.2-1B-shaped full fine-tuning, bf16, packed 8 x 2,048"
timeout 330 python3 benchmarks/gpu_1b.py --steps 20 --warmup 5 2>&1 | tail -15 | tee "$OUT/gpu_1b.txt"

echo "== MoE: the layer against a loop and transformers, expert LoRA on CUDA (bf16)"
timeout 150 python3 benchmarks/moe_layer.py 2>&1 | grep -v Warning | tail -3 | tee "$OUT/moe_layer.txt"
timeout 120 python3 -m pytest -n 0 -p no:cacheprovider -q tests/peft/test_moe_lora.py -k cuda 2>&1 |
    tail -3 | tee "$OUT/moe_lora_cuda.txt"

echo "== Qwen3-30B-A3B's architecture, 4 layers: full fine-tuning, bf16, packed 4 x 2,048"
timeout 240 python3 benchmarks/gpu_1b.py --moe --batch-size 4 --steps 15 --warmup 5 2>&1 |
    tail -12 | tee "$OUT/moe_train.txt"

