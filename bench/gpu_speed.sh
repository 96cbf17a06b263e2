#!/usr/bin/env bash
# Issue 6 speed/memory, one device call per shape group, the stock baseline in the same call:
#   bash bench/gpu_speed.sh qlora8b   # Llama-3.1-8B shape, QLoRA, real chat lengths, 8 samples/step:
#                                     #   stock (dropout 0.1 = XTuner's recipe, and 0), fast (default)
#   LOGS=/tmp/logs bash bench/gpu_speed.sh tune  # row padding / allocator / liger variants, 8B + 1.5B
#   bash bench/gpu_speed.sh pyspy8b   # the fast path's CPU time by function (py-spy)
#   bash bench/gpu_speed.sh graphs    # eager step vs the same step as a CUDA graph (the CPU-free ceiling)
#   bash bench/gpu_speed.sh mem8b     # Llama-3.1-8B shape, QLoRA, 1 x 2048 random tokens: stock, fast, fast in 7.5 GiB
#   bash bench/gpu_speed.sh small     # Qwen2.5-0.5B and 1.5B shapes, bf16 LoRA, chat lengths: stock and fast
#                                     #   (SHAPES=qwen2.5-1.5b REPEAT=3 SKIP_D01=1: alternated repeats)
#   bash bench/gpu_speed.sh long-stock          # stock's longest sequence within 80 GiB (bisection)
#   SEQ=N bash bench/gpu_speed.sh long-fast     # the fast path, 3 steps at N tokens within 80 GiB
#   SEQ=N bash bench/gpu_speed.sh long-fast-part  # the same one step per call, resumed (3 calls, warm machine)
#   BUDGETS="8 12 16 24" ROWS2048=1 bash bench/gpu_speed.sh budgets  # issue 17: 8B QLoRA under memory
#                                     #   budgets and Unsloth on the same rows, one call
#   CHECK=1 BUDGETS="12 16 24" MLPOFF=12 AGAIN=12 bash bench/gpu_speed.sh budgets  # + MLP recompute probes
#   BUDGET=6 bash bench/gpu_speed.sh budgets-small  # the same for the 1.5B bf16 LoRA
#   LOGS=/tmp/logs bash bench/gpu_speed.sh pyspy-budget  # issue 17: py-spy of the 1.5B (none, 6 GiB) and 8B (8 GiB)
#   LOGS=/tmp/logs PART=1.5b bash bench/gpu_speed.sh cache-ab  # issue 17: fused LoRA weight copies vs the
#                                     #   previous fused_lora.py (PART=8b: the 8B half; none: both)
#   bash bench/gpu_speed.sh sdpa      # flash vs cuDNN attention on one 348k-token row (bench/sdpa_probe.py)
# Needs .bench/chat_tokens.jsonl (here: python bench/speed.py prep .bench) and the .whl wheels
# (bash bench/device_wheels.sh builds .whl and .peer); results: $OUT/speed.jsonl + logs.
set -uo pipefail
source bench/device_env.sh
GROUP="${1:-qlora8b}"; shift || true
EXTRA=("$@")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'trl', trl.__version__)"
python3 -c "import liger_kernel, triton; print('liger-kernel ok, triton', triton.__version__)" || echo "no liger-kernel"
TOK=.bench/chat_tokens.jsonl
LOGS="${LOGS:-$OUT}"; mkdir -p "$LOGS"  # a call returns at most 8 files: LOGS=/tmp/logs for many runs
R=(python3 bench/speed.py run --tokens "$TOK" --out "$OUT/speed.jsonl")

one() {  # label, then speed.py args; the log of each run kept, a one-line summary printed
  local label="$1"; shift
  local t0=$SECONDS
  "${R[@]}" --label "$label" "$@" "${EXTRA[@]}" > "$LOGS/$label.log" 2>&1
  local rc=$?
  echo "$label rc=$rc $((SECONDS - t0))s $(grep -o '"non_pad_tokens_per_s": [0-9.]*\|"peak_device_used_gib": [0-9.]*\|"peak_reserved_gib": [0-9.]*' "$LOGS/$label.log" | tr '\n' ' ')"
  [ $rc -eq 0 ] || tail -25 "$LOGS/$label.log"
}

peer() {  # Unsloth's SFTTrainer on the same rows: its own trl/datasets (.peer/w) and none of ours
  local t0=$SECONDS
  if [ ! -d /tmp/su ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/su .peer/w/*.whl \
      $(ls .whl/*.whl | grep -v 'trl-\|datasets-\|transformers-\|liger') || return 1
  fi
  PYTHONPATH="/tmp/su:$PWD/.whl/site" python3 .peer/unsloth_sft.py "${PEER_MODEL:-/tmp/m8b}" "$TOK" --label unsloth --out "$OUT/peer.jsonl" "$@" \
    > "$LOGS/unsloth.log" 2>&1
  local rc=$?
  echo "unsloth rc=$rc $((SECONDS - t0))s $(grep -o '"non_pad_tokens_per_s": [0-9.]*\|"peak_device_used_gib": [0-9.]*' "$LOGS/unsloth.log" | tr '\n' ' ')"
  [ $rc -eq 0 ] || tail -25 "$LOGS/unsloth.log"
}

case "$GROUP" in
  qlora8b)  # 30 steps, the first 5 untimed; a short warm-up run first fills Triton's kernel cache
    # (a fresh machine compiles liger's kernels in the first run); "fast" twice: the run-to-run spread
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    S=(--steps 30 --warmup 5)
    one warm-up --model /tmp/m8b --side fast --method qlora --steps 8
    [ -n "${SKIP_D01:-}" ] || one stock-d0.1 --model /tmp/m8b --side stock --method qlora --dropout 0.1 "${S[@]}"
    one stock-d0 --model /tmp/m8b --side stock --method qlora --dropout 0 "${S[@]}"
    one fast --model /tmp/m8b --side fast --method qlora "${S[@]}"
    one fast-unfused --model /tmp/m8b --side fast --method qlora --fused off "${S[@]}"
    one fast-again --model /tmp/m8b --side fast --method qlora "${S[@]}"
    ;;
  gcprobe)  # why the checkpointed step is slow: 8B chat rows, checkpointing off / all / half the
    # layers / fused LoRA off / a 12 GiB budget, torch profiler tables of gc on and off; then
    # 1 x 2048 rows: off, all layers, 7.5 GiB budget, 7.5 with non-paged 8-bit AdamW
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    S=(--steps 16 --warmup 4)
    M=(--model /tmp/m8b --side fast --method qlora)
    one warm-up "${M[@]}" --steps 6
    one fast "${M[@]}" "${S[@]}"
    one gc-all "${M[@]}" --gc on "${S[@]}"
    one gc-16 "${M[@]}" --gc on --gc-layers 16 "${S[@]}"
    one gc-all-unfused "${M[@]}" --gc on --fused off "${S[@]}"
    one budget12 "${M[@]}" --gpu-mem 12 "${S[@]}"
    one gc-all-profile "${M[@]}" --gc on --steps 11 --warmup 4 --profile 2
    one fast-profile "${M[@]}" --steps 11 --warmup 4 --profile 2
    L=(--seq 2048 --mb 1 --steps 12 --warmup 4)
    one 2048-off "${M[@]}" "${L[@]}"
    one 2048-gc-all "${M[@]}" --gc on "${L[@]}"
    one 2048-7.5 "${M[@]}" --gpu-mem 7.5 "${L[@]}"
    one 2048-7.5-bnb8bit "${M[@]}" --gpu-mem 7.5 --optim adamw_bnb_8bit "${L[@]}"
    ;;
  budgets)  # issue 17: 8B QLoRA chat rows under memory budgets (training.gpu_memory_gib), the
    # project and Unsloth (../shared/peers harness, carried as .peer/: its wheels in .peer/w) in
    # this one call; BUDGETS to pick (default 8 12 16 24), STEPS (default 30), PROFILE=1 adds torch
    # profiler tables of the every-layer checkpointed step, ROWS2048=1 the 1 x 2048 rows in 7.5 GiB
    # (ROWS2048_FAST=1 also without a budget);
    # probes: REENTRANT=1 every layer non-reentrant, EMB="12 16" those budgets with embeddings kept on the GPU,
    # ALLOC=1 no budget under the classic allocator; MLP recompute (training.mlp_recompute):
    # CHECK=1 first checks it against the plain MLP on a 0.5B under liger (bench/mlp_check.py),
    # MLPOFF="12" those budgets with it off (after the peer), MLPALL=1 no budget with every MLP
    # recomputing (its cost where nothing needs it), AGAIN="12" those budgets once more after the
    # peer (the spread within the call), PROFILE_BUDGET=12 profiler tables of that budget's step,
    # OPT8="12" those budgets with 8-bit AdamW forced (core.optim's: is it cheaper than recompute?)
    if [ -n "${CHECK:-}" ]; then
      python3 bench/make_random_model.py qwen2.5-0.5b /tmp/q05 > /dev/null 2>&1
      python3 bench/mlp_check.py /tmp/q05 > "$LOGS/mlp-check.log" 2>&1; echo "mlp-check rc=$?"
      grep '^{' "$LOGS/mlp-check.log" || tail -25 "$LOGS/mlp-check.log"
    fi
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    N=${STEPS:-30}; S=(--steps "$N" --warmup 5)
    M=(--model /tmp/m8b --side fast --method qlora)
    one warm-up "${M[@]}" --steps 6
    one fast "${M[@]}" "${S[@]}"
    [ -z "${ALLOC:-}" ] || PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False one fast-classic-alloc "${M[@]}" "${S[@]}"
    [ -n "${SKIP_GC:-}" ] || one gc-all "${M[@]}" --gc on "${S[@]}"
    [ -z "${REENTRANT:-}" ] || one gc-all-nonreentrant "${M[@]}" --gc on --reentrant off "${S[@]}"
    for b in ${BUDGETS:-8 12 16 24}; do one budget-$b "${M[@]}" --gpu-mem "$b" "${S[@]}"; done
    for b in ${EMB:-}; do one budget-$b-emb-gpu "${M[@]}" --gpu-mem "$b" --emb-cpu off "${S[@]}"; done
    [ -z "${PROFILE:-}" ] || one gc-all-profile "${M[@]}" --gc on --steps 11 --warmup 4 --profile 2
    peer "${S[@]}"
    for b in ${MLPOFF:-}; do one budget-$b-mlp-off "${M[@]}" --gpu-mem "$b" --mlp-recompute 0 "${S[@]}"; done
    [ -z "${MLPALL:-}" ] || one fast-mlp-all "${M[@]}" --mlp-recompute all "${S[@]}"
    for b in ${AGAIN:-}; do one budget-$b-again "${M[@]}" --gpu-mem "$b" "${S[@]}"; done
    [ -z "${PROFILE_BUDGET:-}" ] || one budget-$PROFILE_BUDGET-profile "${M[@]}" --gpu-mem "$PROFILE_BUDGET" \
        --steps 11 --warmup 4 --profile 2
    if [ -n "${ROWS2048:-}" ]; then  # 1 x 2048 random rows: the project within 7.5 GiB, Unsloth as it is
      L=(--seq 2048 --mb 1 --steps 12 --warmup 4)
      [ -z "${ROWS2048_FAST:-}" ] || one 2048-fast "${M[@]}" "${L[@]}"  # (no budget: the plentiful case)
      one 2048-budget-7.5 "${M[@]}" --gpu-mem 7.5 "${L[@]}"
      peer "${L[@]}" --label unsloth-2048
    fi
    for b in ${OPT8:-}; do one budget-$b-adamw8bit "${M[@]}" --gpu-mem "$b" --optim adamw_bnb_8bit "${S[@]}"; done
    ;;
  budgets-small)  # issue 17: Qwen2.5-1.5B shape, bf16 LoRA, chat rows: the project with no budget
    # and within BUDGET GiB (default 6), Unsloth's LoRA path, this one call
    python3 bench/make_random_model.py qwen2.5-1.5b /tmp/qwen2.5-1.5b
    N=${STEPS:-30}; S=(--steps "$N" --warmup 5)
    M=(--model /tmp/qwen2.5-1.5b --side fast --method lora)
    one 1.5b-warm-up "${M[@]}" --steps 6
    one 1.5b-fast "${M[@]}" "${S[@]}"
    one 1.5b-budget-${BUDGET:-6} "${M[@]}" --gpu-mem "${BUDGET:-6}" "${S[@]}"
    PEER_MODEL=/tmp/qwen2.5-1.5b peer --method lora "${S[@]}" --label unsloth-1.5b
    ;;
  pyspy-budget)  # issue 17: where the CPU time of the budgeted steps goes (py-spy, by function):
    # the 1.5B bf16 LoRA without a budget and within 6 GiB, and the 8B QLoRA within 8 GiB, with
    # Unsloth's figure for each shape in this call (py-spy's sampling costs the sampled runs a little)
    python3 bench/make_random_model.py qwen2.5-1.5b /tmp/qwen2.5-1.5b
    M=(--model /tmp/qwen2.5-1.5b --side fast --method lora); S=(--steps 30 --warmup 5)
    one 1.5b-warm-up "${M[@]}" --steps 6
    one 1.5b-fast-pyspy "${M[@]}" "${S[@]}" --pyspy 12 --pyspy-out "$LOGS/pyspy-1.5b-fast.txt"
    one 1.5b-budget-6-pyspy "${M[@]}" --gpu-mem 6 "${S[@]}" --pyspy 12 --pyspy-out "$LOGS/pyspy-1.5b-b6.txt"
    PEER_MODEL=/tmp/qwen2.5-1.5b peer --method lora "${S[@]}" --label unsloth-1.5b
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    M=(--model /tmp/m8b --side fast --method qlora); S=(--steps 24 --warmup 5)
    one warm-up "${M[@]}" --steps 6
    one budget-8-pyspy "${M[@]}" --gpu-mem 8 "${S[@]}" --pyspy 15 --pyspy-out "$LOGS/pyspy-8b-b8.txt"
    peer "${S[@]}"
    sleep 2
    for f in 1.5b-fast 1.5b-b6 8b-b8; do
      python3 bench/stacks.py "$LOGS/pyspy-$f.txt" --top 60 > "$OUT/pyspy-$f-summary.txt" 2>&1
      echo "== $f"; head -70 "$OUT/pyspy-$f-summary.txt"
    done
    grep -h "memory plan" "$LOGS"/1.5b-budget-6-pyspy.log "$LOGS"/budget-8-pyspy.log | cut -c1-600
    ;;
  cache-ab)  # issue 17: the fused LoRA layers with the step's compute-dtype weight copies
    # (fused_lora.compute_weights) against the previous commit's fused_lora.py (carried as
    # .bench/fused_lora_old.py, with its memory.py) in this one call: 1.5B bf16 LoRA without a budget and within 6 GiB,
    # 8B QLoRA within 8 GiB, Unsloth for each shape
    rm -rf /tmp/lsroot_old; mkdir -p /tmp/lsroot_old/lorastudio; cp -r core /tmp/lsroot_old/lorastudio/core
    cp .bench/fused_lora_old.py /tmp/lsroot_old/lorastudio/core/fused_lora.py
    cp .bench/memory_old.py /tmp/lsroot_old/lorastudio/core/memory.py
    for room in webui presets cli; do ln -sfn "$PWD/$room" "/tmp/lsroot_old/lorastudio/$room"; done
    OLDPY="/tmp/site:$PWD/.whl/site:/tmp/lsroot_old"
    S=(--steps ${STEPS:-24} --warmup 5)
    if [ "${PART:-all}" != 8b ]; then  # PART=1.5b or 8b: one shape per call
    python3 bench/make_random_model.py qwen2.5-1.5b /tmp/qwen2.5-1.5b
    M=(--model /tmp/qwen2.5-1.5b --side fast --method lora)
    one 1.5b-warm-up "${M[@]}" --steps 6
    one 1.5b-fast "${M[@]}" "${S[@]}"
    PYTHONPATH="$OLDPY" one 1.5b-fast-old "${M[@]}" "${S[@]}"
    one 1.5b-budget-6 "${M[@]}" --gpu-mem 6 "${S[@]}"
    PYTHONPATH="$OLDPY" one 1.5b-budget-6-old "${M[@]}" --gpu-mem 6 "${S[@]}"
    PEER_MODEL=/tmp/qwen2.5-1.5b peer --method lora "${S[@]}" --label unsloth-1.5b
    fi
    [ "${PART:-all}" != 1.5b ] || exit 0
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    M=(--model /tmp/m8b --side fast --method qlora)
    one warm-up "${M[@]}" --steps 6
    one budget-8 "${M[@]}" --gpu-mem 8 "${S[@]}"
    PYTHONPATH="$OLDPY" one budget-8-old "${M[@]}" --gpu-mem 8 "${S[@]}"
    for b in ${BUDGETS:-}; do one budget-$b "${M[@]}" --gpu-mem "$b" "${S[@]}"; done
    peer "${S[@]}"
    ;;
  tune)  # which row layout and allocator the fast path wants: padding-free rows padded to a
    # multiple of 1 (none), 8, 64 (the default), 256; the expandable-segments allocator; liger off.
    # 8B QLoRA then 1.5B LoRA, stock d0 in the same call; run logs in $LOGS
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    S=(--steps 30 --warmup 5)
    M=(--model /tmp/m8b --side fast --method qlora)
    one warm-up "${M[@]}" --steps 8
    one stock-d0 --model /tmp/m8b --side stock --method qlora --dropout 0 "${S[@]}"
    one fast "${M[@]}" "${S[@]}"
    one fast-pad1 "${M[@]}" --pad 1 "${S[@]}"
    one fast-pad256 "${M[@]}" --pad 256 "${S[@]}"
    one fast-pad8 "${M[@]}" --pad 8 "${S[@]}"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True one fast-expandable "${M[@]}" "${S[@]}"
    one fast-kernels-off "${M[@]}" --kernels off "${S[@]}"
    one fast-again "${M[@]}" "${S[@]}"
    python3 bench/make_random_model.py qwen2.5-1.5b /tmp/qwen2.5-1.5b
    M=(--model /tmp/qwen2.5-1.5b --side fast --method lora)
    one 1.5b-stock-d0 --model /tmp/qwen2.5-1.5b --side stock --method lora --dropout 0 "${S[@]}"
    one 1.5b-warm-up "${M[@]}" --steps 8
    one 1.5b-fast "${M[@]}" "${S[@]}"
    one 1.5b-fast-pad1 "${M[@]}" --pad 1 "${S[@]}"
    one 1.5b-fast-kernels-off "${M[@]}" --kernels off "${S[@]}"
    ;;
  pyspy8b)  # where the fast path's CPU time goes: py-spy over the timed steps, by function
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    one fast-pyspy --model /tmp/m8b --side fast --method qlora --steps 30 --pyspy 15 --pyspy-out "$OUT/pyspy.txt"
    sleep 2; python3 bench/stacks.py "$OUT/pyspy.txt" --top 45 > "$OUT/pyspy-summary.txt"; head -100 "$OUT/pyspy-summary.txt"
    ;;
  mem8b)
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    one mem-stock --model /tmp/m8b --side stock --method qlora --seq 2048 --mb 1 --steps 6 --dropout 0.1
    one mem-fast --model /tmp/m8b --side fast --method qlora --seq 2048 --mb 1 --steps 6
    # an 8 GB card's budget: the memory plan turns checkpointing on, picks paged 8-bit AdamW and
    # moves the embedding table to CPU RAM; peak_device_used_gib (context + managed memory) is the figure
    one mem-fast-7.5 --model /tmp/m8b --side fast --method qlora --seq 2048 --mb 1 --steps 6 --gpu-mem 7.5
    ;;
  small)  # stock at the fast path's dropout 0 (SKIP_D01 unset: also 0.1, XTuner's recipe);
    # SHAPES to pick (default both); REPEAT=N alternates stock d0 and fast N times (the small
    # shapes are CPU-bound and their ratio moves with the machine: 1.5B 2.85-3.64x across H200 calls, docs/BENCHMARKS.md)
    S=(--steps 30 --warmup 5)
    for shape in ${SHAPES:-qwen2.5-0.5b qwen2.5-1.5b}; do
      python3 bench/make_random_model.py $shape /tmp/$shape
      [ -n "${SKIP_D01:-}" ] || one $shape-stock --model /tmp/$shape --side stock --method lora --dropout 0.1 "${S[@]}"
      one $shape-warm-up --model /tmp/$shape --side fast --method lora --steps 8
      for i in $(seq 1 "${REPEAT:-1}"); do
        one $shape-stock-d0-$i --model /tmp/$shape --side stock --method lora --dropout 0 "${S[@]}"
        one $shape-fast-$i --model /tmp/$shape --side fast --method lora "${S[@]}"
      done
    done
    ;;
  graphs)  # the step without its CPU cost: eager vs one CUDA graph replayed (bench/graph_probe.py)
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    python3 bench/graph_probe.py /tmp/m8b --method qlora --bucket 2048 --out "$OUT/graphs.jsonl" > "$OUT/graph-8b.log" 2>&1
    echo "graph 8b rc=$?"; grep '^{\|graph vs\|peak\|Error' "$OUT/graph-8b.log" | cut -c1-400
    python3 bench/make_random_model.py qwen2.5-1.5b /tmp/qwen2.5-1.5b
    python3 bench/graph_probe.py /tmp/qwen2.5-1.5b --method lora --bucket 2048 --out "$OUT/graphs.jsonl" > "$OUT/graph-1.5b.log" 2>&1
    echo "graph 1.5b rc=$?"; grep '^{\|graph vs\|peak\|Error' "$OUT/graph-1.5b.log" | cut -c1-400
    exit 0
    ;;
  long-stock)  # stock's longest trainable sequence on a card capped at 80 GiB (bisection, one process)
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    one long-stock --model /tmp/m8b --side stock --method qlora --bisect --cap 80 --dropout 0.1
    ;;
  long-fast)  # the fast path, 3 steps at SEQ tokens (10x stock's longest) within the same 80 GiB
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    one long-fast --model /tmp/m8b --side fast --method qlora --seq "${SEQ:?SEQ=10x stock max}" --mb 1 --steps 3 \
        --warmup 0 --cap 80
    ;;
  long-fast-part)  # one of three back-to-back calls on one warm machine (it keeps /tmp for 30 s):
    # each resumes /tmp/long-run's last checkpoint and runs one more step at SEQ tokens
    python3 bench/make_random_model.py llama3.1-8b /tmp/m8b
    one long-fast-part --model /tmp/m8b --side fast --method qlora --seq "${SEQ:?SEQ=10x stock max}" --mb 1 \
        --steps 3 --steps-per-call 1 --warmup 0 --cap 80 --workdir /tmp/long-run
    ls /tmp/long-run
    ;;
  sdpa)  # no model, no speed.jsonl: one JSON line per backend and pass
    python3 bench/sdpa_probe.py ${SEQ:-348160} | tee "$OUT/sdpa.jsonl"
    exit  # the probe's status (pipefail)
    ;;
  *) echo "unknown group $GROUP"; exit 2 ;;
esac
python3 - "$OUT/speed.jsonl" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
print(f"{'label':22} {'tok/s':>9} {'MFU':>6} {'alloc':>6} {'resv':>6} {'device':>6} {'pred':>6} {'batch':>6}  loss 1..3 / last")
for r in rows:
    if "stock_max_seq" in r:
        print(f"{r['label']:22} stock's longest trainable sequence under {r['cap_gib']} GiB: {r['stock_max_seq']} "
              f"(first OOM {r['first_oom']})  {r['gpu']}")
        continue
    l = r["losses"]
    print(f"{r['label']:22} {r['non_pad_tokens_per_s']:9.0f} {r['mfu']:6.3f} {r['peak_allocated_gib']:6.2f} "
          f"{r['peak_reserved_gib']:6.2f} {r['peak_device_used_gib']:6.2f} {r.get('predicted_peak_gib') or 0:6.2f} "
          f"{r.get('largest_batch_tokens', 0):6d}  {[round(x, 4) for x in l[:3]]} / {l[-1]:.4f}  {r['gpu']}")
PY
