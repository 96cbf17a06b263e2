"""RunConfig: YAML round trip, field-path errors, device-dependent resolution, presets."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorastudio.core import config as C
from lorastudio.core import resolve as resolve_lib

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_round_trip(tmp_path):
    cfg = C.RunConfig()
    C.save(cfg, tmp_path / "c.yaml")
    again = C.load(tmp_path / "c.yaml")
    assert again == cfg
    assert again.model.name_or_path == "builtin:tiny"


@pytest.mark.parametrize("text, expected", [
    ("training:\n  learning_rate: -1\n", "training.learning_rate"),
    ("training:\n  learning_rate: 0\n", "training.learning_rate"),
    ("training:\n  micro_batch_size: 0\n", "training.micro_batch_size"),
    ("training:\n  micro_batch_size: many\n", "training.micro_batch_size"),
    ("training:\n  lerning_rate: 1e-4\n", "training.lerning_rate: unknown key"),
    ("modle:\n  name_or_path: x\n", "modle: unknown key"),
    ("lora:\n  r: 0\n", "lora.r"),
    ("lora:\n  dropout: 1.5\n", "lora.dropout"),
    ("method: full\nquantization:\n  bits: 4\n", "quantization.bits: full fine-tuning"),
    ("method: lora\nquantization:\n  bits: 4\n", "quantization.bits: set method: qlora"),
    ("method: dpo\n", "method"),
    ("data:\n  sources: []\n", "data.sources"),
    ("data:\n  sources:\n    - {path: a.json, ratio: 0}\n", "data.sources.0.ratio"),
    ("template:\n  name: custom\n", "template.custom_jinja"),
    ("quantization:\n  bits: 3\n", "quantization.bits"),
])
def test_bad_configs_name_the_field(tmp_path, text, expected):
    with pytest.raises(C.ConfigError) as e:
        C.load(write(tmp_path, text))
    assert expected in str(e.value)
    assert str(tmp_path / "cfg.yaml") in str(e.value)  # the file is named too


def test_not_yaml_and_not_mapping(tmp_path):
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(tmp_path / "nope.yaml")


def test_yaml_is_safe_loaded(tmp_path):
    # a python object tag must not construct anything
    with pytest.raises(C.ConfigError):
        C.load(write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n"))


def test_overrides(tmp_path):
    p = write(tmp_path, "training:\n  learning_rate: 1e-4\n")
    cfg = C.load(p, ["training.learning_rate=5e-4", "lora.target_modules=[q_proj, v_proj]", "method=full"])
    assert cfg.training.learning_rate == 5e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.method == "full"
    with pytest.raises(C.ConfigError, match="training.epochs"):
        C.load(p, ["training.epochs=-2"])


def test_qlora_defaults_to_4_bits():
    cfg = C.from_dict({"method": "qlora"})
    assert cfg.quantization.bits == 4


def test_resolve_on_cpu_fills_device_dependent_values():
    cfg = resolve_lib.resolve(C.from_dict({"method": "qlora"}))
    assert cfg.training.device == "cpu"
    assert cfg.model.dtype == "float32"
    assert cfg.training.gradient_checkpointing is False  # 12x slower on CPU
    assert cfg.training.optimizer == "adamw_torch"
    dumped = yaml.safe_load(C.to_yaml(cfg))
    assert "auto" not in (dumped["model"]["dtype"], dumped["training"]["optimizer"],
                          dumped["training"]["gradient_checkpointing"])


def test_paged_optimizer_on_cpu_is_a_clear_error():
    with pytest.raises(C.ConfigError, match="training.optimizer: paged_adamw_8bit .* needs CUDA"):
        resolve_lib.resolve(C.from_dict({"method": "qlora", "training": {"optimizer": "paged_adamw_8bit"}}))


def test_presets_open_with_their_command_and_validate():
    from lorastudio import presets

    files = presets.preset_files()
    assert {"tiny_demo", "tiny_smoke"} <= set(files)
    for name, path in files.items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# lorastudio train "), (name, first)
        C.load(path)  # every preset is a valid config


def test_the_wheel_is_one_package_lorastudio(tmp_path):
    """Build the wheel, install it (not editable) into a folder, and use it from elsewhere: its
    top level is lorastudio alone, the presets ship inside it, `import core` does not exist."""
    import shutil

    src = tmp_path / "src"  # setuptools writes build/ beside the sources: a copy keeps the checkout clean
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "artifacts",
                                                              "__pycache__", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"cannot build a wheel here: {out.stderr[-200:]}")
    assert out.returncode == 0, out.stderr[-2000:]
    import zipfile

    wheel = next(tmp_path.glob("lorastudio-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"lorastudio", wheel.name.split("-py3")[0] + ".dist-info"}
    top = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["lorastudio"]
    for name in ("presets/tiny_demo.yaml", "presets/tiny_smoke.yaml", "core/train.py", "webui/app.py", "cli/commands.py"):
        assert f"lorastudio/{name}" in names
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                          str(site), str(wheel)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    code = ("import lorastudio.core, lorastudio.presets as p; print(lorastudio.core.__file__); "
            "print(p.resolve('tiny_demo')); import core")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    lines = out.stdout.split()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site)), out.stdout
    assert "ModuleNotFoundError: No module named 'core'" in out.stderr
    # from the checkout, the folder `core` is not a second copy of lorastudio.core
    out = subprocess.run([sys.executable, "-c", "import core"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "ImportError: import lorastudio.core, not core" in out.stderr
