#!/usr/bin/env bash
# QLoRA (bitsandbytes NF4) and bf16 LoRA on CUDA through the product's own CLI, one device call.
# Run on the device (see docs/GPU.md):
#   bash bench/gpu_qlora_smoke.sh        (carry .whl: trl, datasets, pydantic, bitsandbytes cuda130)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD/.whl/site:$PWD"
fi
export LORASTUDIO_HOME=/tmp/lshome
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import torch, transformers, peft, trl, bitsandbytes, datasets
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "trl", trl.__version__, "bitsandbytes", bitsandbytes.__version__, "datasets", datasets.__version__)
print("gpu", torch.cuda.get_device_name(0))
PY
# A random-init model with the real Qwen2.5-0.5B architecture (24 layers, hidden 896, GQA 14/2),
# paired with the embedded tokenizer (ids stay below the vocab).
python3 - <<'PY'
import torch, shutil
from transformers import Qwen2Config, Qwen2ForCausalLM
from core import tiny
src = tiny.model_path()
cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_theta=1e6, eos_token_id=2, pad_token_id=3)
torch.manual_seed(0)
m = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained("/tmp/qwen05b-random", safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(src / f, "/tmp/qwen05b-random" / __import__("pathlib").Path(f))
print("built /tmp/qwen05b-random", sum(p.numel() for p in m.parameters()) / 1e6, "M params")
PY
COMMON=(--set model.name_or_path=/tmp/qwen05b-random --set training.max_steps=40 --set training.sample_every=0
        --set training.micro_batch_size=8 --set training.learning_rate=1e-3 --set data.eval_split=0
        --set lora.r=16 --set template.cutoff_len=256 --set training.save_steps=1000)
for method in qlora lora; do
  python3 -m core.cli train presets/tiny_smoke.yaml --run-dir /tmp/run-$method --set method=$method "${COMMON[@]}" \
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
