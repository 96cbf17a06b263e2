"""Evaluation and experiment tracking (issue 22): training.report_to through the Trainer's own
integrations, the held-out rows a run writes, and `lorastudio eval` scoring a run's targets.
Real training children, the real tiny model, tensorboard's own event reader."""

import json
import math
import os
from pathlib import Path

import pytest

from conftest import _workspace_run, events, lorastudio
from lorastudio.core import data as data_lib

pytestmark = pytest.mark.slow


def need(module: str):
    """An optional extra's package: skip without it locally, FAIL under CI=true (.ci/run installs it)."""
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} is not installed (required when CI=true: .ci/run installs the extras)")
        pytest.skip(f"{module} not installed")


@pytest.fixture(scope="module")
def tracked_run() -> Path:
    """6 steps of the smoke preset reporting to TensorBoard, a checkpoint and an eval every 3 steps."""
    need("tensorboard")
    run_dir = _workspace_run("tracked")
    lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), "--set", "training.max_steps=6",
               "--set", "training.report_to=tensorboard", "--set", "training.save_steps=3",
               "--set", "training.eval_steps=3", "--set", "training.sample_every=0", check=True)
    return run_dir


# ---------------------------------------------------------------- trackers

def test_tensorboard_events_read_back_as_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tracked_run / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*")), "no event file in RUN_DIR/tensorboard"
    acc = EventAccumulator(str(folder))
    acc.Reload()
    tb = {s.step: s.value for s in acc.Scalars("train/loss")}
    ours = {e["step"]: e["loss"] for e in events(tracked_run, "step")}
    assert sorted(tb) == sorted(ours) == [1, 2, 3, 4, 5, 6]  # step = the optimizer step
    for step, loss in ours.items():
        assert tb[step] == pytest.approx(loss, rel=1e-6)  # event files store float32
    tb_eval = {s.step: s.value for s in acc.Scalars("eval/loss")}
    assert tb_eval == pytest.approx({e["step"]: e["eval_loss"] for e in events(tracked_run, "eval")}, rel=1e-6)


def test_trackio_writes_under_the_workspace(tmp_path):
    need("trackio")
    home = tmp_path / "home"
    run_dir = home / "runs" / "tr"
    proc = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), "--set", "training.max_steps=2",
                      "--set", "training.report_to=trackio", "--set", "training.sample_every=0",
                      "--set", "data.eval_split=0", env={"LORASTUDIO_HOME": str(home), "HOME": str(tmp_path / "user")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    stored = [p for p in (home / "trackio").rglob("*") if p.is_file()]
    assert stored, "trackio wrote nothing under $LORASTUDIO_HOME/trackio"
    assert not (tmp_path / "user").exists() or not any((tmp_path / "user").rglob("trackio*"))


def test_missing_tracker_package_is_a_clear_message():
    """The training child raises this as a config error (exit 2, run.json's error) before any model loads."""
    from lorastudio.core import config as config_lib
    from lorastudio.core import trackers

    assert trackers.missing("none") is None and trackers.missing("tensorboard") is None  # installed: [track]
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    msg = trackers.missing("wandb")
    assert msg.startswith("training.report_to: wandb is not installed") and "pip install wandb" in msg
    with pytest.raises(config_lib.ConfigError, match="training.report_to"):
        config_lib.from_dict({"training": {"report_to": "neptune"}})


# ---------------------------------------------------------------- held-out rows

@pytest.fixture(scope="module")
def scored(tracked_run):
    """`lorastudio eval` of every checkpoint, final and the base on the held-out rows."""
    proc = lorastudio("eval", str(tracked_run), "--checkpoint", "all", "--base", "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_held_out_rows_are_written_and_read_back(tracked_run, scored):
    rows, report = data_lib.load_file(tracked_run / "eval_rows.jsonl")
    assert report.format == "openai" and report.rows_skipped == 0
    assert len(rows) == 21  # 10% of the sample's 210 conversations, one training row each
    sample, _ = data_lib.load_file(Path(os.environ["LORASTUDIO_HOME"]) / "cache" / "tiny-v4" / "sample_chat.jsonl")
    assert all(r in sample for r in rows)
    # the held-out rows are the eval split: their loss under the final adapter is the Trainer's last eval loss
    last_eval = events(tracked_run, "eval")[-1]["eval_loss"]
    final = json.loads((tracked_run / "eval" / "eval_rows__final.json").read_text())
    assert final["loss"] == pytest.approx(last_eval, rel=2e-3)
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"]))


# ---------------------------------------------------------------- lorastudio eval

def _result(run_dir: Path, stem: str, target: str) -> dict:
    return json.loads((run_dir / "eval" / f"{stem}__{target}.json").read_text())


def test_eval_every_checkpoint_and_the_base(tracked_run, scored):
    proc = scored
    got = {t: _result(tracked_run, "eval_rows", t) for t in ("checkpoint-3", "checkpoint-6", "final", "base")}
    assert [got[t]["step"] for t in got] == [3, 6, 6, 0]
    assert got["final"]["loss"] == pytest.approx(got["checkpoint-6"]["loss"], rel=1e-5)  # the same weights
    assert got["base"]["loss"] > got["checkpoint-3"]["loss"] > got["final"]["loss"]
    for r in got.values():
        assert r["rows"] == r["generated_rows"] == len(r["answers"]) == 21
        assert 0 <= r["exact_match"] <= 1 and 0 <= r["chrf"] <= 100
        row = r["answers"][0]
        assert {"row", "prompt", "reference", "answer", "exact", "chrf", "loss", "tokens"} <= set(row)
    assert "checkpoint-3" in proc.stdout and "base" in proc.stdout  # the summary table


def test_eval_bad_input_is_one_clear_line(tracked_run, tmp_path):
    proc = lorastudio("eval", str(tracked_run), "--checkpoint", "99")
    assert proc.returncode == 2 and "--checkpoint 99" in proc.stderr and "checkpoints 3, 6" in proc.stderr
    assert "Traceback" not in proc.stderr
    import shutil

    bare = tmp_path / "bare"  # the same run without its held-out rows (trained with eval_split 0)
    shutil.copytree(tracked_run, bare, ignore=shutil.ignore_patterns("eval_rows.jsonl", "eval", "checkpoint-*"))
    proc = lorastudio("eval", str(bare))
    assert proc.returncode == 2 and "no held-out rows" in proc.stderr and "--data" in proc.stderr


def test_tiny_demo_beats_its_base_on_its_own_sample(demo_run):
    """The acceptance test: the demo run answers its own sample better than the untrained base."""
    sample = Path(os.environ["LORASTUDIO_HOME"]) / "cache" / "tiny-v4" / "sample_chat.jsonl"
    proc = lorastudio("eval", str(demo_run), "--data", str(sample), "--base", "--limit", "20", "--max-new-tokens", "32")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    final, base = _result(demo_run, "sample_chat", "final"), _result(demo_run, "sample_chat", "base")
    assert final["rows"] == base["rows"] == 20
    assert final["exact_match"] > base["exact_match"] and final["exact_match"] >= 0.8
    assert final["perplexity"] < base["perplexity"]
    assert final["chrf"] > base["chrf"]
    assert sum(r["exact"] for r in final["answers"]) == round(final["exact_match"] * 20)


def test_eval_view_helpers_read_the_result_files(tracked_run, scored):
    """The Evaluate tab's data: the scores table, the plot's frame over steps, the changed rows."""
    from lorastudio.webui import tab_eval

    files = {t: _result(tracked_run, "eval_rows", t) for t in ("checkpoint-3", "checkpoint-6", "final", "base")}
    assert tab_eval.target_choices(str(tracked_run)) == ["final", "checkpoint-6", "checkpoint-3"]
    table = tab_eval.scores_table(str(tracked_run), "eval_rows")
    assert list(table["target"]) == ["base", "checkpoint-3", "checkpoint-6", "final"]
    assert list(table["loss"]) == pytest.approx([files[t]["loss"] for t in table["target"]], abs=1e-4)
    frame = tab_eval.scores_frame(str(tracked_run), "eval_rows", "loss")
    assert list(frame["step"]) == [0, 3, 6] and list(frame["target"]) == ["base", "checkpoint-3", "checkpoint-6"]
    changed = tab_eval.changed_rows(str(tracked_run), "eval_rows", "base", "final")
    differ = [a["row"] for a, b in zip(files["base"]["answers"], files["final"]["answers"]) if a["answer"] != b["answer"]]
    assert [r["row"] for r in changed] == differ and differ
    assert tab_eval.changed_rows(str(tracked_run), "eval_rows", "final", "checkpoint-6") == []  # the same weights


# ---------------------------------------------------------------- lm-eval-harness on task files of our own

def test_lm_eval_task_files_of_our_own_run_on_the_tiny_model(demo_run, tmp_path):
    need("lm_eval")
    sample = Path(os.environ["LORASTUDIO_HOME"]) / "cache" / "tiny-v4" / "sample_chat.jsonl"
    rows, _ = data_lib.load_file(sample)
    qa = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows
          if len(r["messages"]) == 2 and r["messages"][0]["role"] == "user"][:8]
    gen = tmp_path / "persona.jsonl"  # a generation task: the greedy answer under the run's chat template
    gen.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in qa))
    proc = lorastudio("eval", str(demo_run), "--tasks", str(gen))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads((demo_run / "eval" / "lm-eval" / "lorastudio_persona__final.json").read_text())
    assert out["n_samples"]["lorastudio_persona"]["effective"] == 8
    assert out["results"]["lorastudio_persona"]["exact_match,none"] >= 0.75  # the adapter and template were used
    assert "exact_match" in proc.stdout

    # a multiple-choice task as lm-eval's own YAML, its rows a local file (no hub)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"q": q, "options": [a, "Bananas are purple."], "gold": 0}) + "\n" for q, a in qa))
    (tmp_path / "mc.yaml").write_text(
        "task: my_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{options}}'\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    proc = lorastudio("eval", str(demo_run), "--tasks", str(tmp_path / "mc.yaml"), "--checkpoint",
                      sorted(p.name for p in demo_run.glob("checkpoint-*"))[-1].split("-")[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    mc = next((demo_run / "eval" / "lm-eval").glob("my_mc__checkpoint-*.json"))
    assert json.loads(mc.read_text())["results"]["my_mc"]["acc,none"] >= 0.75

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "choices": ["a", "b"], "answer": 5}\n')
    proc = lorastudio("eval", str(demo_run), "--tasks", str(bad))
    assert proc.returncode == 2 and "bad.jsonl, row 1: 'answer' must be the index of a choice" in proc.stderr


def test_a_dpo_run_scores_reward_accuracy_as_trl_logged_it(tmp_path):
    """A preference run: reward accuracy and margin on the pairs it held out, the same figures as
    TRL's eval_rewards/accuracies and eval_rewards/margins at each checkpoint's step."""
    run_dir = _workspace_run("dpo-eval")
    lorastudio("train", "presets/tiny_dpo.yaml", "--run-dir", str(run_dir), "--set", "model.adapter_from=null",
               "--set", "training.max_steps=4", "--set", "data.eval_split=0.1", "--set", "training.eval_steps=2",
               "--set", "training.save_steps=2", "--set", "training.micro_batch_size=16", "--set", "training.sample_prompts=[]",
               check=True)
    proc = lorastudio("eval", str(run_dir), "--checkpoint", "all")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "REWARD ACC" in proc.stdout
    logged = {e["step"]: e for e in events(run_dir, "eval")}
    for step in (2, 4):
        got = _result(run_dir, "eval_pairs", f"checkpoint-{step}")
        assert got["pairs"] == 9 and got["reference"] == "base"
        assert got["reward_accuracy"] == pytest.approx(logged[step]["eval_rewards/accuracies"], abs=1e-6)
        assert got["reward_margin"] == pytest.approx(logged[step]["eval_rewards/margins"], rel=1e-3, abs=1e-5)


def test_eval_view_acts_only_on_workspace_runs_and_allowed_files(tracked_run, tmp_path):
    from lorastudio.webui import tab_eval

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "run.json").write_text("{}")
    with pytest.raises(Exception, match="not a run of this workspace"):
        tab_eval.launch_eval(str(outside), None, None, False)
    with pytest.raises(Exception, match="outside the folders"):
        tab_eval.launch_eval(str(tracked_run), None, "/etc/passwd", False)
    with pytest.raises(ValueError, match="no checkpoint-99"):
        tab_eval.launch_eval(str(tracked_run), ["checkpoint-99"], None, False)
    assert "no evaluation of this run is running" in tab_eval.stop_eval(str(tracked_run))
