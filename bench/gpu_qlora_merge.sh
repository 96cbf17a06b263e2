#!/usr/bin/env bash
# QLoRA train -> merge (base reloaded in bf16, never 4-bit) -> verification -> chat, on CUDA,
# through the product's own CLI. One device call (carry .whl, see bench/gpu_qlora_smoke.sh):
#   bash bench/gpu_qlora_merge.sh
set -uo pipefail
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"
python3 bench/make_random_model.py qwen2.5-0.5b /tmp/model
python3 -m lorastudio.cli train presets/tiny_smoke.yaml --run-dir /tmp/run-qlora --set method=qlora \
  --set model.name_or_path=/tmp/model --set training.max_steps=30 --set training.sample_every=0 \
  --set training.micro_batch_size=8 --set training.learning_rate=1e-3 --set data.eval_split=0 \
  --set training.save_steps=1000 > "$OUT/train.log" 2>&1
echo "train exit $?"; grep "model:" "$OUT/train.log"
START=$(date +%s.%N)
python3 -m lorastudio.cli convert /tmp/run-qlora --merge --dtype bf16 > "$OUT/convert.log" 2>&1
echo "convert exit $? in $(python3 -c "print(round($(date +%s.%N)-$START,1))") s"
cat /tmp/run-qlora/merged/verification.json | tee "$OUT/verification.json"
python3 - <<'PY'
import json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("/tmp/run-qlora/merged")
print("merged loads with plain AutoModelForCausalLM:", type(m).__name__, next(m.parameters()).dtype,
      "bnb layers:", sum(type(x).__module__.startswith("bitsandbytes") for x in m.modules()))
PY
python3 -m lorastudio.cli chat /tmp/run-qlora --prompt "What is your name?" --greedy --max-new-tokens 16; echo "chat exit $?"
grep -i "device\|cuda\|cpu" "$OUT/convert.log" | head -5
