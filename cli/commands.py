"""`lorastudio` command line. Bare `lorastudio` launches the web app.

Subcommand names are a contract other tools use:
  webui, list-presets, copy-preset, train, estimate, resume, runs, stop, preview, convert, chat, eval
"""

from __future__ import annotations

import argparse
import os

from .common import err
from .eval_commands import add_parser as add_eval_parser
from .run_commands import cmd_estimate, cmd_resume, cmd_retry, cmd_runs, cmd_stop, cmd_train
from .tool_commands import cmd_chat, cmd_convert, cmd_copy_preset, cmd_list_presets, cmd_preview


def cmd_webui(a) -> int:
    from lorastudio.webui.app import LaunchError, launch

    credentials = None
    if a.auth:
        if ":" not in a.auth:
            return err("--auth expects USER:PASSWORD")
        credentials = tuple(a.auth.split(":", 1))
    try:
        return launch(host=a.host, port=a.port, auth=False if a.no_auth else None, allow_dirs=a.allow_dir, share=a.share,
                      credentials=credentials, max_upload_mb=a.max_upload_mb) or 0
    except LaunchError as e:
        return err(str(e))


def _add_scale_flags(p) -> None:
    p.add_argument("--gpus", type=int, metavar="N", help="processes, one per GPU (training.gpus); N > 1 runs "
                   "through `accelerate launch` (on CPU: N gloo processes)")
    p.add_argument("--strategy", choices=["ddp", "fsdp", "zero2", "zero3"],
                   help="multi-GPU strategy (training.strategy); zero2/zero3 need DeepSpeed installed")
    p.add_argument("--offload", action="store_true", help="fsdp/zero: keep parameters/optimizer state in CPU RAM")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lorastudio", description="LoRA Studio: fine-tune LLMs with LoRA/QLoRA. "
                                 "Run with no subcommand to open the web app.")
    sub = ap.add_subparsers(dest="cmd")

    p = sub.add_parser("webui", help="launch the web app (default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--no-auth", action="store_true", help="no access token (anyone on this machine can use it)")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="login required; needed for --share or a non-local --host")
    p.add_argument("--share", action="store_true", help="a public Gradio link (requires --auth)")
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="let the app read files under DIR (default: the workspace and the current folder)")
    p.add_argument("--max-upload-mb", type=int, default=200, help="largest upload accepted (MB)")
    p.set_defaults(func=cmd_webui)

    p = sub.add_parser("list-presets", help="list shipped presets")
    p.set_defaults(func=cmd_list_presets)

    p = sub.add_parser("copy-preset", help="copy a preset to edit it")
    p.add_argument("name")
    p.add_argument("dest")
    p.set_defaults(func=cmd_copy_preset)

    p = sub.add_parser("train", help="train from a config (a YAML file or a preset name)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.learning_rate=1e-4")
    p.add_argument("--run-dir", help="run directory (default: a new one under $LORASTUDIO_HOME/runs)")
    p.add_argument("--detach", action="store_true", help="start the run and return")
    p.add_argument("--gpu-mem", nargs="?", const="", default=None, metavar="SIZE",
                   help="print the VRAM estimate before starting, against SIZE (e.g. 24GB) or the detected GPU")
    _add_scale_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("estimate", help="peak VRAM and time estimate of a config: fits or not, what to change",
                       description="Peak VRAM by component before anything is downloaded. On a named (or detected) "
                       "card, the verdict is the memory plan's: the settings training would pick there "
                       "(checkpointing, 8-bit AdamW, embeddings or activations in CPU RAM), what each costs "
                       "in speed, and whether the run then fits.",
                       epilog="exit status: 0 fits (or no card to compare with), 1 does not fit even with the "
                       "memory plan (the output lists changes that would), 2 bad input (config, --set, --gpu-mem)")
    p.add_argument("config")
    p.add_argument("--gpu-mem", metavar="SIZE", help="the card to check against, e.g. 24GB (default: the detected GPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--dataset-tokens", type=int, help="tokens per epoch, for the time estimate")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("resume", help="continue a stopped or failed run from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--detach", action="store_true")
    _add_scale_flags(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("runs", help="list runs in the workspace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("stop", help="stop a run (SIGTERM, then SIGKILL after --grace seconds)")
    p.add_argument("run_dir")
    p.add_argument("--grace", type=float, default=30.0)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("preview", help="render samples exactly as training sees them")
    p.add_argument("config", nargs="?")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--template", default=None)
    p.add_argument("--format", default="auto", help="dataset format (default: detect)")
    p.add_argument("--custom-template", metavar="FILE", help="a Jinja chat template file (rendered in a sandbox)")
    p.add_argument("--cutoff", type=int, default=None, help="truncate samples to N tokens, as training would")
    p.add_argument("-n", type=int, default=3, help="samples to show (a row split by answer gives several)")
    p.add_argument("--train-on", choices=["all", "last"], default=None, help="train every answer or the last only")
    p.add_argument("--reasoning", choices=["auto", "keep", "strip"], default=None,
                   help="reasoning in earlier answers: as the template does, kept, or removed")
    p.add_argument("--system", choices=["auto", "fold", "refuse"], default=None,
                   help="a system message where the template has no system role: fold it or refuse the row")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="run the model folder's own tokenizer code (only for folders you trust)")
    p.add_argument("--json", action="store_true", help="one JSON list: row, messages, tools, text, trained_spans")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("retry", help="start a failed run again with the suggested fix (e.g. after out-of-memory)")
    p.add_argument("run_dir")
    p.add_argument("--detach", action="store_true")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("convert", help="export a run's adapter, --merge it into a full model, or --gguf it for llama.cpp/Ollama")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", type=int, help="convert RUN_DIR/checkpoint-N instead of adapter/")
    p.add_argument("--merge", action="store_true", help="write a full merged model (safetensors)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                   help="merged weights dtype (auto: the base model's)")
    p.add_argument("--gguf", metavar="TYPE", type=str.lower,
                   help="GGUF for llama.cpp/Ollama (f16, bf16, f32, q8_0, q6_k, q5_k_m, q4_k_m, ...) with a Modelfile, "
                        "through the verified merge (needs the [gguf] extra)")
    p.add_argument("--out", help="output folder (default RUN_DIR/export-adapter, RUN_DIR/merged or RUN_DIR/gguf-TYPE); "
                                 "never overwritten")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("chat", help="chat with a run, a merged model or a base model (RESET, EXIT)")
    p.add_argument("target", help="a run dir, a merged/model folder, a GGUF export (OUT/model-TYPE.gguf), a hub id or builtin:tiny")
    p.add_argument("--checkpoint", type=int)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this one prompt on stdout and exit")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (deterministic)")
    p.add_argument("--base", action="store_true", help="answer with the base model (adapter disabled)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_chat)

    add_eval_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from lorastudio.core.child import NO_PROGRESS_BARS

    for key, value in NO_PROGRESS_BARS.items():  # e.g. building the embedded model draws none
        os.environ.setdefault(key, value)
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.cmd is None:
        a = ap.parse_args(["webui"])
    if a.cmd == "preview" and not a.config and not (a.model and a.data):
        ap.error("preview needs CONFIG, or --model and --data")
    return a.func(a)
