"""GGUF export of a real-size run, every type in one call: the figures the 4-bit criterion needs
(core.gguf_verify judges q4/q5 top-1 agreement only on models of 1B+ parameters).

    python bench/gguf_quant.py RUN_DIR [--types f16,q8_0,q6_k,q4_k_m] [--out bench/results/gguf-NAME.jsonl]

RUN_DIR: a finished LoRA/QLoRA run of a >= 1B model (its base must be on the machine). Each type is
exported with `lorastudio convert RUN_DIR --gguf TYPE --out RUN_DIR/bench-gguf-TYPE` (the merge is
made once, then reused); one JSON line per type: passed, criterion, identical answers, top-1
agreement, tokenization, size, seconds. Needs the [gguf] extra.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--types", default="f16,q8_0,q6_k,q4_k_m")
    ap.add_argument("--out")
    a = ap.parse_args()
    run = Path(a.run_dir).resolve()
    out = Path(a.out or Path(__file__).parent / "results" / f"gguf-{run.name}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    for qtype in a.types.split(","):
        dest = run / f"bench-gguf-{qtype}"
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "lorastudio.cli", "convert", str(run), "--gguf", qtype,
                               "--out", str(dest)], capture_output=True, text=True)
        row = {"type": qtype, "rc": proc.returncode, "seconds": round(time.time() - t0, 1)}
        report = dest / "verification.json"
        if report.exists():
            r = json.loads(report.read_text())
            v = r["verification"]
            row.update(passed=r["passed"], criterion=v["criterion"], parameters=v["parameters"],
                       identical=f"{v['answers']['identical']}/{v['answers']['prompts']}",
                       top1=round(v["answers"]["top1_agreement"], 4), tokenization=v["tokenization"]["same_ids"],
                       metadata=v["metadata"]["checks"], size_bytes=r["size_bytes"])
        else:
            row["error"] = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else proc.stdout[-500:]
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
