#!/usr/bin/env bash
# The README's GPU figures in one run (about 6-8 minutes on one H100 / H200), random weights, bf16:
#
#     bash gpu_bench.sh [LOG_DIR]        # default out/gpu; the log is LOG_DIR/gpu_bench.log
#
# 1. rollout: new tokens/s at batch 64 x 256 new tokens and the share of HBM bandwidth it reaches,
#    Qwen2.5-0.5B and 1.5B shapes; 2. training forward + backward tokens/s, MFU and peak memory;
# 3. one RL step at the default settings, phase by phase, with peak memory; 4. 2 and 3 again with
#    --compile. Each command has its own time limit, so one that hangs does not cost the others.
set -u
log_dir=${1:-out/gpu}
mkdir -p "$log_dir"
log=$log_dir/gpu_bench.log
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

run() {  # run a command with a time limit, keep its output without tqdm's redraws
    local limit=$1
    shift
    echo "### $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v -e 'it/s]' -e 's/it]' -e '^ *$' | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log"
$py -c "import torch; print('torch', torch.__version__)" | tee -a "$log"
run 120 $py rollout.py --bench --only qwen2.5-0.5b,qwen2.5-1.5b --batches 64 --new-tokens 256 --prompt-len 64
run 90 $py bench.py decoder
run 90 $py bench.py qwen2.5-0.5b
run 90 $py bench.py qwen2.5-1.5b
run 200 $py rollout.py --bench --only qwen2.5-0.5b,qwen2.5-1.5b --batches 64 --new-tokens 256 --prompt-len 64 --compile
run 150 $py bench.py qwen2.5-0.5b --compile
