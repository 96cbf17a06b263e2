"""Evaluate a run: `python -m lorastudio.core.evaluate RUN_DIR [--checkpoint N|final|all] [--data FILE]
[--base] [--limit N] [--max-new-tokens N]`.

For each target (the final adapter, a checkpoint, every checkpoint, and with --base the untrained
base from the same weights through PEFT's disable_adapter) it scores the data (the rows the run
held out, RUN_DIR/eval_rows.jsonl, unless --data names a file in any supported format;
core.evaluate_score) and writes RUN_DIR/eval/<data-stem>__<target>.json: top-level loss,
perplexity, exact_match, chrf, and the per-row answers.

Like convert, a child job (own process group, output to RUN_DIR/eval/eval.log) reporting through
RUN_DIR/metrics.jsonl: evaluate_start, evaluate_progress (rows done of a target),
evaluate_target (one file written), evaluate_end, evaluate_failed, evaluate_stopped; each with the
child's pid. SIGTERM stops it between rows (exit 3; the files already written stay, a file is
written whole or not at all). On a GPU it waits for the device lock like every GPU job; one
evaluation of a run at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path

from . import runs

BASE = "base"
FINAL = "final"


class EvalError(ValueError):
    """Bad input: not a run, no such checkpoint, no rows."""


class Stopped(BaseException):
    """SIGTERM: leave between rows (a BaseException: no library's `except Exception` eats it)."""


def log(msg: str) -> None:
    print(f"[lorastudio {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval"


def result_path(run_dir: str | Path, data_stem: str, target: str) -> Path:
    return eval_dir(run_dir) / f"{safe_stem(data_stem)}__{target}.json"


def safe_stem(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "data"


def target_name(checkpoint: int | None) -> str:
    return FINAL if checkpoint is None else f"checkpoint-{checkpoint}"


def targets(run_dir: str | Path, checkpoint: str | None = None, base: bool = False) -> list[str]:
    """The targets an evaluation scores, in order of step: CHECKPOINT None (the final adapter, else
    the newest checkpoint), or a comma list of N, final and all (every checkpoint holding an
    adapter, and final); then base."""
    from . import chat

    run_dir = Path(run_dir)
    have = chat.checkpoints(run_dir)
    final = (run_dir / "adapter" / "adapter_config.json").is_file() or (run_dir / "model").is_dir()
    out: list[str] = []
    for spec in (checkpoint or "").lower().replace(" ", "").split(","):
        if spec in ("", FINAL):
            if final:
                out.append(FINAL)
            elif have and not spec:
                out.append(target_name(have[-1]))
            else:
                raise EvalError(f"{run_dir.name} has no final adapter"
                                + (f" (checkpoints: {', '.join(map(str, have))})" if have else " and no checkpoint"))
        elif spec == "all":
            out += [target_name(s) for s in have] + ([FINAL] if final else [])
            if not have and not final:
                raise EvalError(f"{run_dir.name} has no adapter or checkpoint to evaluate")
        else:
            step = spec.removeprefix("checkpoint-")
            if not step.isdigit() or int(step) not in have:
                raise EvalError(f"--checkpoint {checkpoint}: {run_dir.name} has "
                                + (f"checkpoints {', '.join(map(str, have))}" if have else "no checkpoint")
                                + " (or give final, all)")
            out.append(target_name(int(step)))
    order = {target_name(s): i for i, s in enumerate(have)}
    out = sorted(dict.fromkeys(out), key=lambda t: order.get(t, len(order)))  # each once, by step; final last
    return out + ([BASE] if base else [])


def _step_of(run_dir: Path, target: str) -> int:
    """The optimizer step of a target (0 for the base): the x of a plot over checkpoints."""
    if target == BASE:
        return 0
    if target.startswith("checkpoint-"):
        return int(target.rpartition("-")[2])
    for folder in ("adapter", "model"):
        try:
            return int(json.loads((run_dir / folder / "lorastudio.json").read_text()).get("step") or 0)
        except (OSError, ValueError, TypeError):
            continue
    return 0


def _event(run_dir: Path, event: str, **fields) -> None:
    runs.append_event(run_dir, event, pid=os.getpid(), **fields)


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _template_as_trained(cfg, template):
    # the run's template with its training options (which answers are trained, system folding)
    if template is None:
        return None
    t = cfg.template
    return dataclasses.replace(template, train_on=t.train_on, reasoning=t.reasoning, system=t.system)


def _models(run_dir: Path, cfg, names: list[str], device: str):
    """Yield (target, model, use_adapter): one PeftModel switched between adapters for a LoRA run
    (the base is the same weights with the adapter disabled); a full fine-tune loads its model,
    then the base."""
    from . import chat, convert

    if cfg.method == "full":
        for name in names:
            if name.startswith("checkpoint-"):
                raise EvalError("a full fine-tune's checkpoints are not evaluated here: evaluate final (or --base)")
        for name in names:
            if name == FINAL:
                model, _tok, _tmpl = chat.load_chat_model(run_dir, None, device)
            else:
                tokenizer, _t, _m = convert.run_tokenizer(run_dir)
                dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
                model = convert.load_base(cfg, dtype, device, tokenizer)
            yield name, model, True
            del model
            convert._free()
        return
    first = next((n for n in names if n != BASE), FINAL)
    model, _tok, _tmpl = chat.load_chat_model(run_dir, None if first == FINAL else _step_of(run_dir, first), device)
    for name in names:
        if name != BASE:
            chat.set_checkpoint(model, None if name == FINAL else _step_of(run_dir, name))
        yield name, model, name != BASE


def evaluate(run_dir: str | Path, checkpoint: str | None = None, data: str | None = None, base: bool = False,
             limit: int | None = None, max_new_tokens: int = 256, device: str = "auto") -> list[Path]:
    """Score every target on the data; returns the files written."""
    from . import chat, convert, evaluate_data, evaluate_score

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise EvalError(f"{run_dir} is not a run directory (no config.yaml)")
    names = targets(run_dir, checkpoint, base)
    cfg = convert.run_config(run_dir)
    tokenizer, template, _meta = convert.run_tokenizer(run_dir)
    template = _template_as_trained(cfg, template)
    stage = getattr(cfg, "stage", "sft")
    if stage != "sft" and data is None or data and _pairs_file(data):
        return _evaluate_pairs(run_dir, cfg, tokenizer, template, names, data, limit, chat.pick_device(device))
    path = evaluate_data.data_file(run_dir, data)
    examples, summary = evaluate_data.load_rows(path)
    if limit:
        examples = examples[:limit]
    try:
        import sacrebleu  # noqa: F401 - checked before any model is loaded
    except ImportError:
        raise EvalError(evaluate_score.CHRF_MISSING) from None
    device = chat.pick_device(device)
    stem = "eval_rows" if data is None else path.stem
    log(f"data: {summary}; scoring {len(examples)} rows on {', '.join(names)} ({device})")
    _event(run_dir, "evaluate_start", targets=names, data=str(path), data_stem=safe_stem(stem), rows=len(examples))
    eval_dir(run_dir).mkdir(exist_ok=True)
    written = []
    for k, (name, model, use_adapter) in enumerate(_models(run_dir, cfg, names, device)):
        t0, every = time.time(), max(1, len(examples) // 50)

        def progress(done, total, name=name, k=k):
            if done % every == 0 or done == total:
                _event(run_dir, "evaluate_progress", target=name, done=done, total=total, target_index=k,
                       targets=len(names))

        scores = evaluate_score.score(model, tokenizer, template, examples, cutoff_len=cfg.template.cutoff_len,
                                      use_adapter=use_adapter, max_new_tokens=max_new_tokens, progress=progress)
        out = result_path(run_dir, stem, name)
        _write(out, {"target": name, "step": _step_of(run_dir, name), "run_dir": str(run_dir), "data": str(path),
                     "data_stem": safe_stem(stem), "template": getattr(template, "name", None), "device": device,
                     "elapsed_s": round(time.time() - t0, 2), "created": time.time(), **scores})
        written.append(out)
        _event(run_dir, "evaluate_target", target=name, file=str(out), loss=scores["loss"],
               perplexity=scores["perplexity"], exact_match=scores["exact_match"], chrf=scores["chrf"])
        log(f"{name}: loss {_fmt(scores['loss'])}, perplexity {_fmt(scores['perplexity'])}, exact match "
            f"{_fmt(scores['exact_match'])}, chrF {_fmt(scores['chrf'])} -> {out.name}")
    return written


def _pairs_file(data: str) -> bool:
    from . import preference_data

    return Path(data).is_file() and preference_data.kind_of(data) == "preference"


def _evaluate_pairs(run_dir: Path, cfg, tokenizer, template, names, data, limit, device) -> list[Path]:
    """A preference run (or a file of pairs): reward accuracy per target (core.evaluate_pref)."""
    from . import evaluate_pref

    stage = getattr(cfg, "stage", "sft")
    if stage not in evaluate_pref.PAIRED:
        raise EvalError(f"reward accuracy needs pairs and a dpo, orpo or simpo run (this one: stage {stage}); "
                        "give --data a chat file to score answers instead")
    ds = evaluate_pref.pairs(cfg, tokenizer, template, Path(data).resolve() if data else None)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    stem = "eval_pairs" if data is None else Path(data).stem
    log(f"scoring {len(ds)} pairs on {', '.join(names)} ({device})")
    _event(run_dir, "evaluate_start", targets=names, data=str(data or "held-out pairs"), data_stem=safe_stem(stem),
           rows=len(ds))
    eval_dir(run_dir).mkdir(exist_ok=True)
    written = []
    for k, (name, model, use_adapter) in enumerate(_models(run_dir, cfg, names, device)):
        t0, every = time.time(), max(1, len(ds) // 25)

        def progress(done, total, name=name, k=k):
            if done % every == 0 or done == total:
                _event(run_dir, "evaluate_progress", target=name, done=done, total=total, target_index=k,
                       targets=len(names))

        scores = evaluate_pref.reward_accuracy(model, cfg, ds, progress, use_adapter=use_adapter)
        out = result_path(run_dir, stem, name)
        _write(out, {"target": name, "step": _step_of(run_dir, name), "run_dir": str(run_dir), "stage": cfg.stage,
                     "data": str(data or "held-out pairs"), "data_stem": safe_stem(stem), "rows": scores["pairs"],
                     "loss": None, "perplexity": None, "exact_match": None, "chrf": None, "device": device,
                     "elapsed_s": round(time.time() - t0, 2), "created": time.time(), **scores})
        written.append(out)
        _event(run_dir, "evaluate_target", target=name, file=str(out), loss=None, perplexity=None, exact_match=None,
               chrf=None, reward_accuracy=scores["reward_accuracy"], reward_margin=scores["reward_margin"])
        log(f"{name}: reward accuracy {_fmt(scores['reward_accuracy'])}, margin {_fmt(scores['reward_margin'])} "
            f"-> {out.name}")
    return written


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _on_sigterm(signum, frame):
    raise Stopped()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorastudio.core.evaluate")
    ap.add_argument("run_dir")
    ap.add_argument("--checkpoint", help="N, final or all, or a comma list of them (default: final)")
    ap.add_argument("--data", help="a file in any supported format (default: the rows the run held out)")
    ap.add_argument("--base", action="store_true", help="score the untrained base too")
    ap.add_argument("--limit", type=int, help="the first N rows only")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args(argv)
    from .child import quiet_libraries

    quiet_libraries()  # before torch and transformers are imported
    run_dir = Path(a.run_dir).resolve()
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not (run_dir / "config.yaml").is_file():
        log(f"FAILED: {run_dir} is not a run directory (no config.yaml)")
        return runs.EXIT_CONFIG
    from filelock import FileLock, Timeout

    from . import machine
    from .locks import DeviceLock

    eval_dir(run_dir).mkdir(exist_ok=True)
    held = []
    t0 = time.time()
    try:
        one = FileLock(str(eval_dir(run_dir) / ".lock"))
        try:
            one.acquire(timeout=0)
        except Timeout:
            raise EvalError(f"{run_dir.name} is already being evaluated; try again when that ends") from None
        held.append(one)
        if a.limit is not None and a.limit < 1 or a.max_new_tokens < 1:
            raise EvalError("--limit and --max-new-tokens: at least 1")
        from .chat import pick_device

        device = pick_device(a.device)
        if device == "cpu":
            machine.limit_memory("cpu_job")  # a model too big for this machine fails here, alone
        else:  # one GPU job at a time: wait behind a training run or a merge (visible in the log)
            gpu = DeviceLock("cuda", "eval", run_dir)
            gpu.acquire(wait=True, on_wait=lambda pos, holder: log(
                f"waiting for the GPU: position {pos}, held by {(holder or {}).get('run_dir') or 'another job'}"))
            held.append(gpu)
        files = evaluate(run_dir, a.checkpoint, a.data, a.base, a.limit, a.max_new_tokens, device)
    except Stopped:
        _event(run_dir, "evaluate_stopped")
        log("stopped")
        return runs.EXIT_STOPPED
    except Exception as e:  # noqa: BLE001 - every failure reaches metrics.jsonl with a message
        bad_input = isinstance(e, ValueError)  # EvalError, EvalDataError, ConfigError, TemplateError, ChatError
        if not bad_input:
            traceback.print_exc()
        error = str(e) if bad_input else f"{type(e).__name__}: {e}"
        _event(run_dir, "evaluate_failed", error=error)
        log(f"FAILED: {error}")
        return runs.EXIT_CONFIG if bad_input else runs.EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for lk in reversed(held):
            lk.release()
    _event(run_dir, "evaluate_end", files=[str(f) for f in files], elapsed_s=round(time.time() - t0, 2))
    log(f"done: {len(files)} files in {eval_dir(run_dir)}")
    return runs.EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
