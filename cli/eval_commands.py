"""`lorastudio eval RUN_DIR`: score a run's adapter, checkpoints and base in a child job
(`python -m lorastudio.core.evaluate`, output to RUN_DIR/eval/eval.log, followed here), or with
--tasks run an lm-eval task file of the user's own (`python -m lorastudio.core.lm_eval_job`,
RUN_DIR/eval/lm-eval.log); Ctrl-C stops it (the files already written stay)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from .common import echo_from, err


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a run's adapter/checkpoints (and the base) on held-out or given data",
                       description="Writes RUN_DIR/eval/<data-stem>__<target>.json per data x target: loss and "
                       "perplexity of the trained tokens, exact match and chrF of greedy answers to the last "
                       "assistant turn, and every row's answer.")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", metavar="N|final|all", help="a checkpoint step, final (default) or all; a comma list, e.g. 40,80,final")
    p.add_argument("--data", metavar="FILE", help="rows in any supported format (default: the rows the run held out)")
    p.add_argument("--base", action="store_true", help="score the untrained base as well")
    p.add_argument("--limit", type=int, metavar="N", help="the first N rows only")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest greedy answer (default 256)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g = p.add_argument_group("benchmarks through lm-eval-harness (results in RUN_DIR/eval/lm-eval/)")
    g.add_argument("--tasks", metavar="FILE", help="an lm-eval task .yaml of your own, or .json/.jsonl rows: "
                   "{question, choices, answer} (multiple choice) or {question, answer} (generation)")
    g.add_argument("--model", metavar="DIR", help="with --tasks: a merged or model folder instead of the adapter")
    g.add_argument("--no-chat-template", action="store_true", help="with --tasks: plain prompts, no chat template")
    p.set_defaults(func=cmd_eval)


def cmd_eval(a) -> int:
    from lorastudio.core import runs

    run_dir = Path(a.run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        return err(f"{run_dir} is not a run directory (no config.yaml)")
    if a.tasks:
        if a.data or a.base:
            return err("--tasks runs an lm-eval task file: --data and --base are for the scoring without it")
        cmd = [sys.executable, "-m", "lorastudio.core.lm_eval_job", str(run_dir), "--tasks", str(Path(a.tasks).resolve()),
               "--device", a.device]
        cmd += ["--model", str(Path(a.model).resolve())] if a.model else []
        cmd += ["--no-chat-template"] if a.no_chat_template else []
        log = run_dir / "eval" / "lm-eval.log"
    else:
        cmd = [sys.executable, "-m", "lorastudio.core.evaluate", str(run_dir), "--max-new-tokens",
               str(a.max_new_tokens), "--device", a.device]
        cmd += ["--data", str(Path(a.data).resolve())] if a.data else []
        cmd += ["--base"] if a.base else []
        log = run_dir / "eval" / "eval.log"
    cmd += ["--checkpoint", a.checkpoint] if a.checkpoint else []
    cmd += ["--limit", str(a.limit)] if a.limit is not None else []
    _, offset = runs.read_events(run_dir)
    pos = log.stat().st_size if log.exists() else 0  # echo only this evaluation's part of the log
    proc = runs.spawn(cmd, log, cwd=run_dir)
    try:
        while (code := proc.poll()) is None:
            pos = echo_from(log, pos)
            time.sleep(0.3)
        echo_from(log, pos)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        return err("interrupted (the files already written stay)", runs.EXIT_STOPPED)
    events, _ = runs.read_events(run_dir, offset)
    mine = [e for e in events if e.get("pid") == proc.pid]
    if code != 0:
        failed = [e for e in mine if e.get("event") in ("evaluate_failed", "lm_eval_failed")]
        return err(failed[-1]["error"] if failed else f"eval exited with {code} (see {log})", code)
    for e in mine:
        if e.get("event") == "lm_eval_end":
            print(f"{e['task']} on {e['target']}: " + ", ".join(f"{k} {v:.4g}" for k, v in e["scores"].items()
                                                             if k != "sample_len") + f"  {e['file']}")
    if a.tasks:
        return 0
    done = [e for e in mine if e.get("event") == "evaluate_target"]
    pairs = any("reward_accuracy" in e for e in done)  # a preference run: reward accuracy on pairs
    print(f"{'TARGET':<18} " + (f"{'REWARD ACC':>10} {'MARGIN':>8}" if pairs else
                                f"{'LOSS':>8} {'PPL':>10} {'EXACT':>7} {'CHRF':>7}") + "  FILE")
    for e in done:
        figures = ([f"{_num(e.get('reward_accuracy')):>10}", f"{_num(e.get('reward_margin')):>8}"] if pairs else
                   [f"{_num(e.get(k)):>{w}}" for k, w in (("loss", 8), ("perplexity", 10), ("exact_match", 7),
                                                          ("chrf", 7))])
        print(f"{e['target']:<18} {' '.join(figures)}  {e['file']}")
    return 0


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"
