"""Writes the catalogue presets (python bench/gen_presets.py); each VRAM line is filled by core.estimate,
and tests/test_presets.py fails when a line drifts from the estimator."""
from pathlib import Path

from lorastudio.cli.estimate_text import preset_comment
from lorastudio.core import config as C, estimate as E

P = Path(__file__).resolve().parents[1] / "presets"

def lora_block(r, alpha, dropout, targets="all-linear"):
    t = targets if isinstance(targets, str) else "[" + ", ".join(targets) + "]"
    return f"""lora:
  r: {r}                          # rank: 8-64 typical; more capacity, more memory
  alpha: {alpha}                      # scale = alpha / r
  dropout: {dropout}                   # 0 is fastest; 0.05-0.1 regularises small datasets
  target_modules: {t}
"""

def training_block(epochs, mb, acc, lr, prompts, extra=""):
    pr = "[" + ", ".join(f'"{p}"' for p in prompts) + "]"
    return f"""training:
  epochs: {epochs}
  micro_batch_size: {mb}              # lower it first when out of memory
  grad_accum: {acc}                    # effective batch = micro_batch_size x grad_accum
  learning_rate: {lr}            # LoRA: 1e-4..5e-4; full fine-tuning: 1e-5..5e-5
  lr_scheduler: cosine
  warmup_ratio: 0.03
  gradient_checkpointing: auto     # CUDA: off when the largest batch fits, else the fewest layers that do (training.checkpoint_layers)
  save_steps: 200
  sample_prompts: {pr}
{extra}"""

PROMPTS = ["Introduce yourself in one sentence.", "Give three tips for staying focused while studying."]

def chat(name, title, hub, template, method, data, fmt, cutoff, r, alpha, dropout, epochs, mb, acc, lr,
         targets="all-linear", notes="", model_extra="", packing=False, quant=True, prompts=PROMPTS, extra=""):
    q = "quantization:\n  bits: 4                        # NF4 base weights; LoRA adapters train in 16/32-bit\n  quant_type: nf4\n  double_quant: true             # quantise the quantisation constants: ~0.4 bit/param saved\n" if method == "qlora" else ""
    text = f"""# lorastudio train presets/{name}.yaml
# {{VRAM}}
# {title}
{notes}model:
  name_or_path: {hub}
{model_extra}data:
  sources:
    - path: {data}  # you supply it: a local file (see README "Data and templates")
      format: {fmt}
  eval_split: 0.02               # held out for eval loss
template:
  name: {template}
  cutoff_len: {cutoff}                # tokens per sample; memory grows with it
  packing: {str(packing).lower()}                 # pack short samples into cutoff_len rows
method: {method}
{lora_block(r, alpha, dropout, targets) if method != 'full' else ''}{q}{training_block(epochs, mb, acc, lr, prompts, extra)}"""
    (P / f"{name}.yaml").write_text(text)

S = "data/my_chats.jsonl"
chat("internlm2_5_7b_qlora_guanaco", "InternLM2.5-7B-chat QLoRA on openassistant-guanaco-format data: XTuner's recipe\n# (internlm2_5_chat_7b_qlora_oasst1_e3): r=64, alpha=16, dropout 0.1, lr 2e-4, 2048 tokens packed,\n# 3 epochs, batch 1 x accumulation 16, with evaluation prompts.",
     "internlm/internlm2_5-7b-chat", "internlm2", "qlora", "data/guanaco.jsonl", "guanaco", 2048, 64, 16, 0.1, 3, 1, 16, "2.0e-4",
     model_extra="  trust_remote_code: true        # InternLM2 ships its own modelling code (auto_map): it runs on this machine\n",
     packing=True, prompts=["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"])
for size, mb_l, mb_q in (("0.5B", 2, 2), ("1.5B", 2, 2), ("7B", 1, 1)):
    tag = size.lower().replace(".", "_")
    for method, mb in (("lora", mb_l), ("qlora", mb_q)):
        chat(f"qwen2_5_{tag}_{method}", f"Qwen2.5-{size}-Instruct {'bf16 LoRA' if method == 'lora' else 'QLoRA (4-bit NF4 base)'} on your chat data (openai/sharegpt/alpaca, detected).",
             f"Qwen/Qwen2.5-{size}-Instruct", "qwen", method, S, "auto", 2048, 16, 32, 0.0, 3, mb, 16 // mb, "2.0e-4")
chat("llama3_1_8b_qlora", "Llama-3.1-8B-Instruct QLoRA on your chat data.",
     "meta-llama/Llama-3.1-8B-Instruct", "llama3", "qlora", S, "auto", 2048, 16, 32, 0.0, 2, 1, 16, "2.0e-4",
     notes="# GATED: accept Meta's licence on huggingface.co/meta-llama/Llama-3.1-8B-Instruct and `hf auth login` first.\n")
chat("mistral_7b_v0_3_qlora", "Mistral-7B-Instruct-v0.3 QLoRA on your chat data ([INST] template; no system role of its own).",
     "mistralai/Mistral-7B-Instruct-v0.3", "mistral", "qlora", S, "auto", 2048, 16, 32, 0.0, 2, 2, 8, "2.0e-4")
chat("gemma2_2b_lora", "Gemma-2-2B-it bf16 LoRA on your chat data.",
     "google/gemma-2-2b-it", "gemma", "lora", S, "auto", 1024, 16, 32, 0.0, 3, 2, 8, "2.0e-4",
     notes="# GATED: accept Google's Gemma licence on huggingface.co/google/gemma-2-2b-it and `hf auth login` first.\n"
           "# Gemma-2 softcaps attention logits (tanh at 50): only eager attention honours that (SDPA drops it),\n"
           "# so this preset uses eager; its s x s score matrix makes long cutoffs costly (counted in the estimate).\n",
     model_extra="  attn_implementation: eager     # honours attn_logit_softcapping (sdpa silently ignores it)\n")
chat("phi3_mini_lora", "Phi-3-mini-4k-instruct bf16 LoRA on your chat data.",
     "microsoft/Phi-3-mini-4k-instruct", "phi3", "lora", S, "auto", 2048, 16, 32, 0.0, 3, 2, 8, "2.0e-4",
     targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
     notes="# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: target those names (q_proj etc. do not exist).\n")
chat("smollm2_360m_full", "SmolLM2-360M-Instruct full fine-tuning (every weight trained): small enough for any GPU.",
     "HuggingFaceTB/SmolLM2-360M-Instruct", "smollm", "full", S, "auto", 2048, 0, 0, 0, 3, 4, 4, "2.0e-5")
chat("tinyllama_chat_lora", "TinyLlama-1.1B-Chat-v1.0 bf16 LoRA on your chat data (Zephyr-style template).",
     "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "zephyr", "lora", S, "auto", 2048, 16, 32, 0.0, 3, 4, 4, "2.0e-4")
chat("deepseek_r1_distill_qwen_1_5b_lora", "DeepSeek-R1-Distill-Qwen-1.5B bf16 LoRA: keep the <think> reasoning in your answers if you want it kept.",
     "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek", "lora", S, "auto", 4096, 16, 32, 0.0, 2, 1, 16, "1.0e-4")
chat("qwen2_5_0_5b_pretrain_text", "Continued pretraining of Qwen2.5-0.5B (base) on plain text: every token is trained.",
     "Qwen/Qwen2.5-0.5B", "auto", "lora", "data/corpus.txt", "text", 2048, 64, 128, 0.0, 1, 2, 8, "1.0e-4",
     packing=True, prompts=["The history of the printing press"],
     notes="# Text rows ({text: ...}) have no chat template: the template is unused. Higher r for new knowledge.\n")

for path in sorted(P.glob("*.yaml")):
    if path.stem.startswith("tiny_"):
        continue
    text = path.read_text()
    cfg = C.load(path)
    est = E.estimate(cfg, detect=False)
    text = text.replace("# {VRAM}", preset_comment(est))
    path.write_text(text)
    print(f"{path.stem:40s} {est['total_gib']:6.2f}  " + "  ".join(f"{k}={v:.2f}" for k, v in est['components'].items()))
