#!/usr/bin/env bash
# QLoRA (bitsandbytes NF4) and bf16 LoRA on CUDA through the product's own CLI, one device call.
# Run on the device (see docs/BENCHMARKS.md):
#   bash bench/gpu_qlora_smoke.sh        (carry .whl: trl, datasets, pydantic, bitsandbytes cuda130)
set -uo pipefail
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import torch, transformers, peft, trl, bitsandbytes, datasets
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "trl", trl.__version__, "bitsandbytes", bitsandbytes.__version__, "datasets", datasets.__version__)
print("gpu", torch.cuda.get_device_name(0))
PY
# A random-init model with the real Qwen2.5-0.5B architecture, paired with the embedded tokenizer.
python3 bench/make_random_model.py qwen2.5-0.5b /tmp/qwen05b-random || exit 1
COMMON=(--set model.name_or_path=/tmp/qwen05b-random --set training.max_steps=40 --set training.sample_every=0
        --set training.micro_batch_size=8 --set training.learning_rate=1e-3 --set data.eval_split=0
        --set lora.r=16 --set template.cutoff_len=256 --set training.save_steps=1000)
for method in qlora lora; do
  python3 -m lorastudio.cli train presets/tiny_smoke.yaml --run-dir /tmp/run-$method --set method=$method "${COMMON[@]}" \
    > "$OUT/train-$method.log" 2>&1
  echo "$method exit $?"
  cp /tmp/run-$method/run.json "$OUT/run-$method.json"; cp /tmp/run-$method/metrics.jsonl "$OUT/metrics-$method.jsonl"
  cp /tmp/run-$method/config.yaml "$OUT/config-$method.yaml"
done
python3 - <<'PY'
import json
for method in ("qlora", "lora"):
    ev = [json.loads(l) for l in open(f"/tmp/run-{method}/metrics.jsonl")]
    steps = [e for e in ev if e["event"] == "step"]
    info = json.load(open(f"/tmp/run-{method}/run.json"))
    tail = steps[10:]
    tps = sum(e["tokens_per_s"] for e in tail) / max(len(tail), 1)
    print(f"{method}: status={info['status']} params={info.get('params')} loss {steps[0]['loss']:.3f} -> "
          f"{steps[-1]['loss']:.3f}, mean tokens/s (steps 11-40) {tps:.0f}, peak alloc {max(e['mem_mb'] for e in steps):.0f} MiB")
PY
grep -h "model:\|exit" /tmp/run-*/train.log
