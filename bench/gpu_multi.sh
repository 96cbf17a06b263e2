#!/usr/bin/env bash
# Multi-GPU acceptance on a 2-GPU device (nvidia-h100-x2 / nvidia-h200-x2), one call of
# <= 10 minutes, through the product's own CLI (`lorastudio train --gpus 2` -> accelerate launch):
#   (a) random-init Qwen2.5-1.5B LoRA: 1-GPU baseline (CUDA_VISIBLE_DEVICES=0, micro-batch 16) vs
#       2-GPU DDP (micro-batch 8 per GPU) at the same global batch, 20 steps of packed 1024-token rows:
#       per-step losses of both, max loss diff %, tokens/s of both and the ratio (target >= 1.8x)
#   (b) random-init Qwen2.5-7B QLoRA (NF4, quant storage bf16) under FSDP on 2 GPUs: train, stop
#       (SIGTERM agreed by both ranks at a step), resume to the end; statuses printed
# Run on the device (carry .whl only, as bench/gpu_qlora_smoke.sh):   bash bench/gpu_multi.sh
# Check the CPU-side parts (config generation + validation) anywhere:  bash bench/gpu_multi.sh --dry-run
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"  # the device's NCCL safety setting: must reach every rank
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
DATA="data.sources=[{path: 'builtin:sample', ratio: 40}]"   # ~12k conversations, packed into 1024-token rows
A_SETS=(--set "$DATA" --set template.packing=true --set template.cutoff_len=1024 --set training.max_steps=20
        --set training.grad_accum=1 --set training.learning_rate=2e-4 --set training.lr_scheduler=constant
        --set training.warmup_ratio=0 --set lora.r=16 --set data.eval_split=0 --set training.sample_every=0
        --set "training.sample_prompts=[]" --set training.save_steps=1000)
B_SETS=(--set method=qlora --set template.cutoff_len=512 --set training.micro_batch_size=2 --set training.grad_accum=1
        --set training.save_steps=3 --set training.save_total_limit=2 --set data.eval_split=0
        --set training.sample_every=0 --set "training.sample_prompts=[]" --set training.lr_scheduler=constant
        --set training.warmup_ratio=0)

if [ "${1:-}" = "--dry-run" ]; then
  # what the runs below generate, validated against accelerate's own loader/flags; no GPU needed
  rc=0
  $PY -m lorastudio.core.distributed presets/tiny_smoke.yaml --dry-run --out "$OUT/dry-ddp" --set training.gpus=2 \
      --set model.name_or_path=builtin:tiny "${A_SETS[@]}" --set training.micro_batch_size=8 || rc=1
  $PY -m lorastudio.core.distributed presets/tiny_smoke.yaml --dry-run --out "$OUT/dry-fsdp" --set training.gpus=2 \
      --set training.strategy=fsdp --set model.name_or_path=builtin:tiny "${B_SETS[@]}" || rc=1
  $PY -m lorastudio.core.distributed presets/tiny_smoke.yaml --dry-run --out "$OUT/dry-zero3" --set training.gpus=2 \
      --set training.strategy=zero3 --set training.offload=true --set model.name_or_path=builtin:tiny || rc=1
  echo "dry run: $([ $rc = 0 ] && echo OK || echo FAILED)"; exit $rc
fi

if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  mkdir -p /tmp/lsroot/lorastudio  # the checkout's rooms as the import package lorastudio
  for room in core webui presets cli; do ln -sfn "$PWD/$room" "/tmp/lsroot/lorastudio/$room"; done
  export PYTHONPATH="/tmp/site:$PWD/.whl/site:/tmp/lsroot"
fi
export LORASTUDIO_HOME=/tmp/lshome
T0=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, peft, accelerate, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bnb', bitsandbytes.__version__, 'gpus', torch.cuda.device_count())"
echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"

summary() {  # RUN_DIR -> one line: status, steps, loss first->last
  $PY - "$1" <<'PY'
import json, sys
d = sys.argv[1]
info = json.load(open(f"{d}/run.json"))
steps = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"event": "step"' in l]
print(f"{d}: status={info.get('status')} exit={info.get('exit_code')} steps={[s['step'] for s in steps]} "
      f"error={info.get('error')}")
PY
}

# ---------------------------------------------------------------- (a) 1.5B LoRA: 1 GPU vs 2-GPU DDP
if [ "${ONLY:-}" != "b" ]; then
$PY bench/make_random_model.py qwen2.5-1.5b /tmp/m15 || exit 1
CUDA_VISIBLE_DEVICES=0 timeout 200 $PY -m lorastudio.cli train presets/tiny_smoke.yaml --run-dir /tmp/a1 \
  --set model.name_or_path=/tmp/m15 "${A_SETS[@]}" --set training.micro_batch_size=16 > "$OUT/a1.log" 2>&1
echo "(a) 1-GPU exit $?  ($(( $(date +%s) - T0 )) s so far)"
timeout 200 $PY -m lorastudio.cli train presets/tiny_smoke.yaml --run-dir /tmp/a2 --gpus 2 --strategy ddp \
  --set model.name_or_path=/tmp/m15 "${A_SETS[@]}" --set training.micro_batch_size=8 > "$OUT/a2.log" 2>&1
echo "(a) 2-GPU DDP exit $?  ($(( $(date +%s) - T0 )) s so far)"
grep -h "env NCCL" /tmp/a2/train.log
cp /tmp/a1/metrics.jsonl "$OUT/a1-metrics.jsonl"; cp /tmp/a2/metrics.jsonl "$OUT/a2-metrics.jsonl"
cp /tmp/a2/accelerate.yaml "$OUT/a2-accelerate.yaml"
$PY - <<'PY'
import json
def steps(d):
    return {e["step"]: e for e in (json.loads(l) for l in open(f"{d}/metrics.jsonl")) if e["event"] == "step"}
one, two = steps("/tmp/a1"), steps("/tmp/a2")
print("step  loss_1gpu  loss_2gpu  diff%")
worst = 0.0
for s in sorted(one):
    if s in two:
        d = abs(two[s]["loss"] - one[s]["loss"]) / one[s]["loss"] * 100
        worst = max(worst, d)
        print(f"{s:4d}  {one[s]['loss']:.4f}     {two[s]['loss']:.4f}     {d:.2f}")
tail = lambda st: [st[s]["tokens_per_s"] for s in sorted(st) if s > 5]
t1, t2 = sum(tail(one)) / max(len(tail(one)), 1), sum(tail(two)) / max(len(tail(two)), 1)
print(f"max per-step loss diff {worst:.2f}% (target <= 2%) over {len(set(one) & set(two))} steps")
print(f"tokens/s (steps 6-20): 1 GPU {t1:.0f}, 2 GPUs {t2:.0f}, ratio {t2 / t1 if t1 else 0:.2f}x (target >= 1.8x)")
print("peak MiB: 1 GPU", max(e["mem_mb"] for e in one.values()), " 2 GPUs (rank 0)", max(e["mem_mb"] for e in two.values()))
PY
summary /tmp/a1; summary /tmp/a2
rm -rf /tmp/m15
fi

# ---------------------------------------------------------------- (b) 7B QLoRA under FSDP: train, stop, resume
$PY bench/make_random_model.py qwen2.5-7b /tmp/m7 || exit 1
echo "(b) model built ($(( $(date +%s) - T0 )) s so far)"
$PY -m lorastudio.cli train presets/tiny_smoke.yaml --run-dir /tmp/b --gpus 2 --strategy fsdp --detach \
  --set model.name_or_path=/tmp/m7 "${B_SETS[@]}" --set training.max_steps=10 > "$OUT/b-launch.log" 2>&1
echo "(b) launched: exit $?"
# stop once checkpoint-3 exists and step 4 is logged (the stop lands on a later step boundary)
for i in $(seq 1 150); do
  if [ -f /tmp/b/checkpoint-3/trainer_state.json ] && grep -q '"step": 4,' /tmp/b/metrics.jsonl 2>/dev/null; then break; fi
  st=$($PY -c "import json; print(json.load(open('/tmp/b/run.json')).get('status'))" 2>/dev/null)
  case "$st" in failed|done|stopped) break;; esac
  sleep 2
done
timeout 120 $PY -m lorastudio.cli stop /tmp/b --grace 90; echo "(b) stop exit $?  ($(( $(date +%s) - T0 )) s so far)"
summary /tmp/b
grep -h -A30 "Traceback" /tmp/b/train.log | grep -v "^\s*\^" | tail -40
ls -d /tmp/b/checkpoint-* 2>/dev/null
timeout 240 $PY -m lorastudio.cli resume /tmp/b > "$OUT/b-resume.log" 2>&1
echo "(b) resume exit $?  ($(( $(date +%s) - T0 )) s so far)"
summary /tmp/b
grep -h '"event": "resume"\|"event": "stopped"\|"event": "end"' /tmp/b/metrics.jsonl
grep -h "model:\|env NCCL\|exit [0-9]" /tmp/b/train.log
cp /tmp/b/train.log "$OUT/b-train.log"; cp /tmp/b/metrics.jsonl "$OUT/b-metrics.jsonl"; cp /tmp/b/run.json "$OUT/b-run.json"
cp /tmp/b/accelerate.yaml "$OUT/b-accelerate.yaml"
ls /tmp/b/adapter 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
