"""Benchmarks through lm-eval-harness on a user's own task file: `python -m lorastudio.core.lm_eval_job
RUN_DIR --tasks FILE [--checkpoint N|final] [--model DIR] [--limit N] [--no-chat-template]`.

FILE is local, nothing comes from a hub:
  * an lm-eval task YAML of the user's own (its dataset a local file: `dataset_path: json`,
    `dataset_kwargs: {data_files: {test: ...}}`), run as it is;
  * a JSON/JSONL file of rows: {"question", "choices": [...], "answer": index or the choice's text}
    is a multiple-choice task (acc, acc_norm: the log-likelihood of each choice),
    {"question", "answer": text} a generation task (exact_match of the greedy answer, stopped at
    the run's end-of-turn token and stop strings). A task YAML for it is written beside the results.

The model is the run's base with the adapter (final or checkpoint-N) through lm-eval's own `peft=`
loading, or a merged/model folder (--model), with the run's tokenizer and chat template (applied
by lm-eval unless --no-chat-template). Results: RUN_DIR/eval/lm-eval/<task>__<target>.json (lm-eval's
results, configs and per-sample answers). A child job like core.evaluate: RUN_DIR/eval/lm-eval.log,
lm_eval_start / lm_eval_end / lm_eval_failed / lm_eval_stopped events with its pid, SIGTERM stops it
(exit 3), the device lock on a GPU. lm-eval's datasets cache lives under $LORASTUDIO_HOME/cache.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import yaml

from . import runs, safe_io
from .evaluate import EvalError, Stopped, eval_dir, log, safe_stem

MISSING = "lm-eval-harness is not installed: pip install 'lorastudio[lm-eval]' (or pip install lm-eval)"


def out_dir(run_dir: str | Path) -> Path:
    return eval_dir(run_dir) / "lm-eval"


def _rows(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path.name}, line {n}: not JSON ({e.msg})") from None
        return out


def task_from_rows(path: Path, folder: Path, stops: list[str]) -> str:
    """Write an lm-eval task (YAML + its normalised rows) for a JSON/JSONL file of questions;
    returns the task's name."""
    rows = _rows(path)
    if not rows:
        raise EvalError(f"{path.name}: holds no rows")
    mc = isinstance(rows[0], dict) and "choices" in rows[0]
    clean = []
    for n, r in enumerate(rows, 1):
        where = f"{path.name}, row {n}"
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or "answer" not in r:
            raise EvalError(f"{where}: expected an object with 'question' and 'answer'"
                            + (" and 'choices'" if mc else ""))
        if mc:
            choices, answer = r.get("choices"), r["answer"]
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise EvalError(f"{where}: 'choices' must be a list of at least two strings")
            if isinstance(answer, str) and answer in choices:
                answer = choices.index(answer)
            if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                raise EvalError(f"{where}: 'answer' must be the index of a choice (0-{len(choices) - 1}) or its text")
            clean.append({"question": r["question"], "choices": choices, "answer": answer})
        else:
            if not isinstance(r["answer"], str):
                raise EvalError(f"{where}: 'answer' must be text (or give 'choices' for a multiple-choice task)")
            clean.append({"question": r["question"], "answer": r["answer"]})
    name = f"lorastudio_{safe_stem(path.stem)}".replace(".", "_").replace("-", "_")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in clean), encoding="utf-8")
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}"}
    if mc:
        task.update(output_type="multiple_choice", doc_to_choice="{{choices}}",
                    metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    else:
        task.update(output_type="generate_until",
                    generation_kwargs={"until": list(dict.fromkeys([s for s in stops if s] + ["\n\n"])),
                                       "do_sample": False, "max_gen_toks": 256},
                    metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return name


def task_of(path: Path, folder: Path, stops: list[str]) -> tuple[str, Path]:
    """(task name, the folder lm-eval includes tasks from) of the user's file."""
    if not path.is_file():
        raise EvalError(f"--tasks {path}: file not found")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = safe_io.read_yaml(path)
        except safe_io.FileProblem as e:
            raise EvalError(str(e)) from None
        if not isinstance(data, dict) or not isinstance(data.get("task"), str):
            raise EvalError(f"{path.name}: an lm-eval task file names its task (task: NAME)")
        return data["task"], path.parent
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise EvalError(f"--tasks {path.name}: an lm-eval task .yaml, or .json/.jsonl rows of questions")
    return task_from_rows(path, folder / "tasks", stops), folder / "tasks"


def model_args(run_dir: Path, checkpoint: str | None, model: str | None, device: str) -> tuple[dict, str]:
    """lm-eval's HFLM arguments for the target, and the target's name."""
    from . import convert
    from . import model as model_lib
    from .evaluate import FINAL, target_name

    cfg = convert.run_config(run_dir)
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    common = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if model:
        folder = Path(model).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise EvalError(f"--model {model}: not a model folder (no config.json)")
        return {"pretrained": str(folder), "tokenizer": str(folder), **common}, safe_stem(folder.name)
    if cfg.method == "full":
        if checkpoint not in (None, "", FINAL):
            raise EvalError("a full fine-tune is benchmarked as its final model (or --model DIR)")
        return {"pretrained": str(run_dir / "model"), "tokenizer": str(run_dir / "model"), **common}, FINAL
    step = None if checkpoint in (None, "", FINAL) else checkpoint.removeprefix("checkpoint-")
    if step is not None and not step.isdigit():
        raise EvalError(f"--checkpoint {checkpoint}: a step number or final (with --tasks)")
    adapter = convert.adapter_dir(run_dir, int(step) if step else None)  # ConvertError names what the run has
    # the tokenizer as training saved it (added tokens, the run's template): adapter/ when it is there
    tok = run_dir / "adapter" if (run_dir / "adapter" / "tokenizer_config.json").is_file() else adapter
    return ({"pretrained": model_lib.resolve_path(cfg.model.name_or_path), "peft": str(adapter), "tokenizer": str(tok),
             **common}, target_name(int(step) if step else None))


def run(run_dir: Path, tasks: str, checkpoint: str | None, model: str | None, limit: int | None, chat: bool,
        device: str) -> Path:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError(MISSING) from None
    from . import convert

    args, target = model_args(run_dir, checkpoint, model, device)
    _tok, template, _meta = convert.run_tokenizer(run_dir)
    stops = [getattr(template, "eot_token", None) or _tok.eos_token, *(getattr(template, "stop_strings", None) or [])]
    name, include = task_of(Path(tasks).expanduser().resolve(), out_dir(run_dir), stops)
    log(f"lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''}: task {name} on {target} "
        f"({device}{', chat template' if chat else ''})")
    runs.append_event(run_dir, "lm_eval_start", pid=os.getpid(), task=name, target=target)
    t0 = time.time()
    result = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[name], device=device,
                                     task_manager=TaskManager(include_path=str(include), include_defaults=False),
                                     batch_size=8 if device == "cuda" else 1, limit=limit, log_samples=True,
                                     apply_chat_template=chat)
    out = out_dir(run_dir) / f"{safe_stem(name)}__{target}.json"
    report = {"task": name, "target": target, "model_args": args, "results": result.get("results"),
              "configs": result.get("configs"), "versions": result.get("versions"),
              "n_samples": result.get("n-samples"), "chat_template": chat, "elapsed_s": round(time.time() - t0, 2),
              "samples": (result.get("samples") or {}).get(name)}
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, out)
    scores = {k: v for k, v in (result.get("results") or {}).get(name, {}).items() if isinstance(v, (int, float))}
    runs.append_event(run_dir, "lm_eval_end", pid=os.getpid(), task=name, target=target, file=str(out), scores=scores)
    log(f"{name} on {target}: {scores} -> {out}")
    return out


def _on_sigterm(signum, frame):
    raise Stopped()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorastudio.core.lm_eval_job")
    ap.add_argument("run_dir")
    ap.add_argument("--tasks", required=True, help="an lm-eval task .yaml, or .json/.jsonl rows of questions")
    ap.add_argument("--checkpoint", help="a step, or final (default)")
    ap.add_argument("--model", help="a merged or model folder instead of the run's adapter")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--no-chat-template", action="store_true")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args(argv)
    run_dir = Path(a.run_dir).resolve()
    from . import workspace

    # lm-eval loads the task's rows through datasets: its cache under the workspace, never ~/.cache
    os.environ.setdefault("HF_DATASETS_CACHE", str(workspace.cache_dir() / "datasets"))
    from .child import quiet_libraries

    quiet_libraries()
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not (run_dir / "config.yaml").is_file():
        log(f"FAILED: {run_dir} is not a run directory (no config.yaml)")
        return runs.EXIT_CONFIG
    out_dir(run_dir).mkdir(parents=True, exist_ok=True)
    lock = None
    try:
        from .chat import pick_device

        device = pick_device(a.device)
        if device == "cuda":  # one GPU job at a time
            from .locks import DeviceLock

            lock = DeviceLock("cuda", "lm-eval", run_dir)
            lock.acquire(wait=True, on_wait=lambda pos, holder: log(f"waiting for the GPU: position {pos}"))
        run(run_dir, a.tasks, a.checkpoint, a.model, a.limit, not a.no_chat_template, device)
    except Stopped:
        runs.append_event(run_dir, "lm_eval_stopped", pid=os.getpid())
        log("stopped")
        return runs.EXIT_STOPPED
    except Exception as e:  # noqa: BLE001 - every failure reaches metrics.jsonl with a message
        bad_input = isinstance(e, ValueError)
        if not bad_input:
            traceback.print_exc()
        error = str(e) if bad_input else f"{type(e).__name__}: {e}"
        runs.append_event(run_dir, "lm_eval_failed", pid=os.getpid(), error=error)
        log(f"FAILED: {error}")
        return runs.EXIT_CONFIG if bad_input else runs.EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if lock is not None:
            lock.release()
    return runs.EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
