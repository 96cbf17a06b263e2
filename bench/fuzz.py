"""Bounded fuzz run (hypothesis) of what reads untrusted input: the data readers, chat-template
rendering, config YAML and the run-directory readers.

    python bench/fuzz.py                       # 400 examples per target (~10 min on 2 cores)
    python bench/fuzz.py --examples 50 --only templates

Each target states what may happen: a result, or the one error type meant for people (DataError,
TemplateError, ConfigError, FileProblem); anything else, or an example slower than --slow seconds,
is a finding. Prints one JSON line per target (examples, findings, seconds, slowest example) and
appends them to bench/results/fuzz-<date>.jsonl; docs/RELIABILITY.md quotes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LORASTUDIO_HOME", tempfile.mkdtemp(prefix="lorastudio-fuzz-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# ---------------------------------------------------------------- strategies

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=40))
json_value = st.recursive(json_scalar, lambda kids: st.lists(kids, max_size=5)
                          | st.dictionaries(st.text(max_size=12), kids, max_size=5), max_leaves=30)
roles = st.sampled_from(["system", "user", "assistant", "human", "gpt", "bot", "tool", "", "USER", None])
message = st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=200), json_value)})
chat_row = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message, max_size=6)}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": roles, "value": st.one_of(st.text(max_size=100), json_value)}), max_size=6)}),
    st.fixed_dictionaries({"instruction": st.text(max_size=80), "input": st.text(max_size=40),
                           "output": st.one_of(st.text(max_size=80), json_value)}),
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=200), json_value)}),
    json_value)

EXTS = [".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet"]


@st.composite
def data_file(draw):
    ext = draw(st.sampled_from(EXTS))
    kind = draw(st.sampled_from(["rows", "bytes", "text"]))
    if kind == "bytes":
        return ext, draw(st.binary(max_size=2000))
    if kind == "text":
        return ext, draw(st.text(max_size=2000)).encode(draw(st.sampled_from(["utf-8", "utf-16", "latin-1"])),
                                                        "replace")
    rows = draw(st.lists(chat_row, max_size=8))
    if ext == ".jsonl":
        return ext, "".join(json.dumps(r) + "\n" for r in rows).encode()
    if ext in (".csv", ".tsv"):
        sep = "," if ext == ".csv" else "\t"
        lines = ["instruction" + sep + "output"] + [sep.join(json.dumps(v) for v in (r, r)) for r in rows]
        return ext, "\n".join(lines).encode()
    if ext == ".parquet":
        return ext, b"PAR1" + json.dumps(rows).encode() + b"PAR1"
    return ext, json.dumps(rows).encode()


# Jinja from a grammar of the constructs templates use (and abuse): loops, namespaces, filters with
# large arguments, the growth operators.
ints = st.sampled_from([0, 1, 2, 3, 7, 100, 10**5, 10**6, 10**9, -1])
strs = st.sampled_from(["'a'", "'<'", "'{:>9}'", "'%s'", "message.content", "m.role", "ns.x", "''"])
FILTERS = ["upper", "trim", "length", "string", "tojson", "list", "join", "reverse", "first", "last", "unique",
           "sort", "striptags", "title", "wordcount", "center", "indent", "replace", "truncate", "batch", "slice"]


def _expr(depth: int):
    leaf = st.one_of(strs, ints.map(str), st.sampled_from(["messages", "range(10)", "ns.l", "loop.index",
                                                             "[ns.x, ns.x]", "dict(a=1)"]))
    if depth <= 0:
        return leaf
    sub = _expr(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(sub, st.sampled_from([" * ", " + ", " ~ ", " ** ", " % ", " == ", " in "]), sub).map("".join),
        st.tuples(sub, st.sampled_from(FILTERS), st.lists(st.one_of(ints.map(str), strs), max_size=2))
        .map(lambda t: f"({t[0]})|{t[1]}" + (f"({', '.join(t[2])})" if t[2] else "")),
        st.tuples(strs, st.sampled_from(["replace", "center", "ljust", "join", "format", "split"]),
                  st.lists(st.one_of(ints.map(str), strs), max_size=2))
        .map(lambda t: f"{t[0]}.{t[1]}({', '.join(t[2])})"))


def _stmt(depth: int):
    out = st.tuples(_expr(2)).map(lambda t: "{{ " + t[0] + " }}")
    setx = st.tuples(st.sampled_from(["x", "l"]), _expr(2)).map(lambda t: "{% set ns." + t[0] + " = " + t[1] + " %}")
    text = st.sampled_from(["hello ", "<|im_end|>", "\n", "{# c #}"])
    if depth <= 0:
        return st.one_of(out, setx, text)
    body = st.lists(_stmt(depth - 1), max_size=3).map("".join)
    loop = st.tuples(_expr(1), body).map(lambda t: "{% for m in " + t[0] + " %}" + t[1] + "{% endfor %}")
    cond = st.tuples(_expr(1), body).map(lambda t: "{% if " + t[0] + " %}" + t[1] + "{% endif %}")
    macro = body.map(lambda b: "{% macro f(n) %}" + b + "{{ f(n) if n else '' }}{% endmacro %}{{ f(1) }}")
    gen = body.map(lambda b: "{% generation %}" + b + "{% endgeneration %}")
    return st.one_of(out, setx, text, loop, cond, macro, gen)


template_source = st.lists(_stmt(3), min_size=1, max_size=5).map(
    lambda parts: "{% set ns = namespace(x='a', l=[1]) %}" + "".join(parts))

yaml_doc = st.one_of(
    st.text(max_size=500),
    st.recursive(json_scalar, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["model", "training", "lora", "data", "template", "epochs", "r", "sources", "x"]), kids,
        max_size=4), max_leaves=25).map(json.dumps),
    st.integers(1, 12).map(lambda n: "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(n))))


# ---------------------------------------------------------------- targets

def _run(name: str, strategy, check, examples: int, slow: float) -> dict:
    findings, timings = [], []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(example):
        t0 = time.time()
        try:
            check(example)
        except Exception as e:  # noqa: BLE001 - a finding, recorded and shrunk no further
            findings.append({"example": repr(example)[:500], "error": f"{type(e).__name__}: {str(e)[:300]}",
                             "where": traceback.format_exc().splitlines()[-3:]})
        took = time.time() - t0
        timings.append((took, repr(example)[:200]))
        if took > slow:
            findings.append({"example": repr(example)[:500], "error": f"slow: {took:.1f} s"})

    t0 = time.time()
    prop()
    slowest = max(timings, default=(0, ""))
    return {"target": name, "examples": len(timings), "findings": len(findings), "seconds": round(time.time() - t0, 1),
            "slowest_s": round(slowest[0], 2), "slowest_example": slowest[1], "details": findings[:5]}


def check_data(example):
    from lorastudio.core.data import DataError, load_file

    ext, content = example
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{ext}"
        path.write_bytes(content)
        for fmt in ("auto", "openai", "alpaca", "text"):
            try:
                load_file(str(path), fmt)
            except DataError:
                pass


_TOK = {}


def check_template(source):
    from lorastudio.core import render, templates

    if "tok" not in _TOK:
        from lorastudio.core import model as model_lib

        _TOK["tok"] = model_lib.load_tokenizer("builtin:tiny")
    conversation = [{"role": "user", "content": "hi <b>there</b>"}, {"role": "assistant", "content": "hello"}]
    try:
        render.render_batch(source, [conversation], tokenizer=_TOK["tok"], track=True)
    except templates.TemplateError:
        pass


def check_yaml(text):
    from lorastudio.core import config, safe_io

    try:
        data = safe_io.load_yaml(text, "fuzz.yaml") or {}
        config.from_dict(data if isinstance(data, dict) else {"x": data})
    except (safe_io.FileProblem, config.ConfigError):
        pass


def check_run_dir(example):
    from lorastudio.core import history, runs

    run_json, metrics = example
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "run.json").write_bytes(run_json)
        (Path(d) / "metrics.jsonl").write_bytes(metrics)
        runs.status(d)
        events, _ = runs.read_events(d)
        history.curves(d, events)
        history.best_checkpoint(d, events)
        history.summarize(d)


run_dir_files = st.tuples(
    st.one_of(st.binary(max_size=300), json_value.map(lambda v: json.dumps(v).encode())),
    st.lists(st.one_of(st.binary(max_size=100), st.fixed_dictionaries(
        {"event": st.sampled_from(["step", "eval", "checkpoint", "x"]), "step": json_value, "loss": json_value,
         "eval_loss": json_value, "lr": json_value}).map(json.dumps).map(str.encode)), max_size=20)
    .map(b"\n".join))

TARGETS = {"data": (data_file(), check_data), "templates": (template_source, check_template),
           "yaml": (yaml_doc, check_yaml), "run_dir": (run_dir_files, check_run_dir)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--only", choices=sorted(TARGETS), action="append")
    ap.add_argument("--slow", type=float, default=15.0, help="seconds an example may take")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"fuzz-{time.strftime('%Y-%m-%d')}.jsonl"))
    a = ap.parse_args()
    results = []
    check_template("{{ 'warm-up' }}")  # the tokenizer (and the embedded model, on a first run) outside the timings
    for name in a.only or TARGETS:
        strategy, check = TARGETS[name]
        r = _run(name, strategy, check, a.examples, a.slow)
        results.append(r)
        print(json.dumps(r), flush=True)
    with open(a.out, "a") as f:
        for r in results:
            f.write(json.dumps({**r, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count()}) + "\n")
    return 1 if any(r["findings"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
