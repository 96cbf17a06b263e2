"""A run directory written by an earlier version (tests/fixtures/run-318d927: the config.yaml,
run.json and metrics.jsonl of a 12-step tiny_smoke run trained by commit 318d927, before the
package became lorastudio; no weights) still lists, shows its curves and reruns from its config."""

import json
import shutil

import pytest

from conftest import ROOT, _workspace_run, lorastudio
from lorastudio.core import history, runs

FIXTURE = ROOT / "tests" / "fixtures" / "run-318d927"


@pytest.fixture
def old_run():
    run_dir = _workspace_run("old-318d927")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(FIXTURE, run_dir)
    yield run_dir
    shutil.rmtree(run_dir, ignore_errors=True)


def test_an_old_run_lists_with_its_status_and_summary(old_run):
    listed = {i["run_dir"]: i for i in runs.list_runs()}
    assert str(old_run) in listed and listed[str(old_run)]["status"] == "done"
    assert runs.status(old_run)["status"] == "done"  # a read: nothing signalled, nothing rewritten
    assert json.loads((old_run / "run.json").read_text()) == json.loads((FIXTURE / "run.json").read_text())
    summary = history.summarize(old_run)
    assert (summary["status"], summary["model"], summary["method"], summary["step"]) == ("done", "builtin:tiny", "lora", 12)
    assert summary["loss"] is not None and summary["best_eval_loss"] is not None
    assert summary["best_checkpoint"] is None  # its checkpoints' weights are not in the fixture
    assert any(row["run_dir"] == str(old_run) for row in history.list_history())


def test_an_old_run_shows_its_curves(old_run):
    from lorastudio.webui.train_view import curve_frames, run_view, status_markdown

    curves = history.curves(old_run)
    assert [s for s, _ in curves["loss"]] == list(range(1, 13)) and len(curves["eval_loss"]) == 2
    v = run_view(str(old_run))
    assert v["status"] == "done" and len(v["loss"]) == 12 and len(v["eval_loss"]) == 2
    loss, _lr = curve_frames(v)
    assert set(loss["series"]) == {"loss", "eval_loss"} and len(loss) == 14
    assert "done" in status_markdown(v)


@pytest.mark.slow
def test_an_old_run_reruns_from_its_config_yaml(old_run, tmp_path):
    new = _workspace_run("rerun-318d927")
    res = lorastudio("train", str(old_run / "config.yaml"), "--run-dir", str(new), "--set", "training.max_steps=3",
                     "--set", "training.save_steps=3", "--set", "training.eval_steps=3")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert runs.status(new)["status"] == "done"
    assert [s for s, _ in history.curves(new)["loss"]] == [1, 2, 3]
    assert (new / "adapter" / "adapter_config.json").is_file()
    shutil.rmtree(new, ignore_errors=True)
