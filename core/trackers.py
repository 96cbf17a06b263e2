"""training.report_to: step metrics to a tracker as well as metrics.jsonl, through the Trainer's
own integrations (transformers' TensorBoardCallback, TrackioCallback, WandbCallback, MLflowCallback;
their tags: `train/loss`, `train/learning_rate`, `eval/loss`, step = the optimizer step).

Where each writes is decided here, before the Trainer is built, so nothing lands in the source
tree or the user's home: TensorBoard event files in RUN_DIR/tensorboard/ (the integration's
TENSORBOARD_LOGGING_DIR), trackio's database under $LORASTUDIO_HOME/trackio/ (its TRACKIO_DIR, read
when trackio is imported), wandb's files in the run directory (WANDB_DIR, unless set).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# report_to -> (the module the integration imports, the package that provides it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "trackio": ("trackio", "trackio"),
            "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
EXTRA = {"tensorboard", "trackio"}  # in pip install 'lorastudio[track]'


def missing(report_to: str) -> str | None:
    """The message for a tracker whose package is not installed (None: installed, or none asked)."""
    if report_to in (None, "none"):
        return None
    module, package = PACKAGES[report_to]
    if importlib.util.find_spec(module) is not None:
        return None
    how = f"pip install 'lorastudio[track]' (or pip install {package})" if report_to in EXTRA else f"pip install {package}"
    return (f"training.report_to: {report_to} is not installed in this environment; {how}, "
            "or set training.report_to: none")


def setup(report_to: str, run_dir: Path) -> list[str]:
    """Point the chosen tracker at its folder; returns TrainingArguments' report_to list."""
    if report_to in (None, "none"):
        return []
    from . import workspace

    if report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(run_dir) / "tensorboard")
    elif report_to == "trackio":
        os.environ["TRACKIO_DIR"] = str(workspace.home() / "trackio")
    elif report_to == "wandb":
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    return [report_to]
