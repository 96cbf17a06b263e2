"""llama.cpp for GGUF export and chat: the optional extra `[gguf]` (llama-cpp-python, gguf).

llama-cpp-python's wheel holds the llama.cpp library (loading, quantizing, generating) but not
llama.cpp's converter: `convert_hf_to_gguf.py`, its `conversion/` package and the `gguf-py` it
writes with live only in the source archive pip built the wheel from. So on first use the
converter is taken from that same archive, fetched from the package index by pip (its cache
answers when pip just built the wheel from it), checked against the pinned sha256, and unpacked
under $LORASTUDIO_HOME/cache/ next to a record of where it came from. Nothing of llama.cpp is
ever part of this repository.

    require()               -> the llama_cpp module, or GGUFUnavailable saying how to install it
    converter()             -> the folder holding convert_hf_to_gguf.py (fetched once, pinned)
    supported_architectures(), check_architecture(arch)   the converter's own registry
    run_converter(model_dir, gguf_path, outtype, log)     llama.cpp's converter in a child process
    quantize(src, dst, type)                              llama.cpp's llama_model_quantize, in a child
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from . import workspace

LLAMA_CPP_VERSION = "0.3.36"  # requirements.lock pins the same
SDIST = f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
INSTALL_HINT = ('install the GGUF extra: pip install -c requirements.lock -e ".[gguf]" in the checkout '
                f'(llama-cpp-python {LLAMA_CPP_VERSION} builds llama.cpp with cmake and a C++ compiler: '
                'minutes on 2 cores, once; pip caches the wheel)')
VENDORED = "vendor/llama.cpp/"
# what the converter needs from the archive (its licence travels with it)
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")

# Output types: those the converter writes itself, and those llama.cpp quantizes to (from f16).
CONVERTER_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k")
TYPES = CONVERTER_TYPES + QUANT_TYPES


class GGUFUnavailable(ValueError):
    """The [gguf] extra is missing, or the converter cannot be fetched: the message says what to do."""


def require():
    """The llama_cpp module at the pinned version."""
    try:
        import llama_cpp
    except ImportError as e:
        raise GGUFUnavailable(f"GGUF needs llama-cpp-python, which is not installed ({e}); {INSTALL_HINT}") from None
    have = getattr(llama_cpp, "__version__", "?")
    if have != LLAMA_CPP_VERSION:
        raise GGUFUnavailable(f"llama-cpp-python {have} is installed; LoRA Studio's GGUF export is pinned to "
                              f"{LLAMA_CPP_VERSION} (its converter is checked against that release): {INSTALL_HINT}")
    return llama_cpp


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFUnavailable(f"GGUF needs the gguf package, which is not installed; {INSTALL_HINT}") from None
    return gguf


# ---------------------------------------------------------------- the converter, from the index

def converter_home() -> Path:
    return workspace.home() / "cache" / f"llama.cpp-convert-{LLAMA_CPP_VERSION}"


def converter(log=print) -> Path:
    """The folder with convert_hf_to_gguf.py, conversion/ and gguf-py/ of the pinned release."""
    from filelock import FileLock

    home = converter_home()
    if (home / "SOURCE.json").exists():
        return home
    home.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home) + ".lock"):
        if (home / "SOURCE.json").exists():
            return home  # another job fetched it while this one waited
        with tempfile.TemporaryDirectory(dir=home.parent, prefix=".fetch-") as tmp:
            archive = _download_sdist(Path(tmp), log)
            unpacked = Path(tmp) / "converter"
            _unpack(archive, unpacked)
            (unpacked / "SOURCE.json").write_text(json.dumps(
                {"package": "llama-cpp-python", "version": LLAMA_CPP_VERSION, "archive": SDIST,
                 "sha256": SDIST_SHA256, "members": f"{VENDORED}{{{','.join(CONVERTER_PARTS)}}}"}, indent=2))
            shutil.rmtree(home, ignore_errors=True)
            unpacked.rename(home)
    log(f"llama.cpp converter {LLAMA_CPP_VERSION} unpacked to {home}")
    return home


def _download_sdist(tmp: Path, log) -> Path:
    local = os.environ.get("LORASTUDIO_LLAMA_CPP_SDIST")  # an archive already on disk (offline machines)
    if local:
        archive = Path(local)
    else:
        log(f"fetching llama.cpp's converter: {SDIST} from the package index (pip; its cache when it built the wheel)")
        req = tmp / "requirements.txt"
        # --require-hashes: pip itself refuses an archive that is not the pinned one
        req.write_text(f"llama-cpp-python=={LLAMA_CPP_VERSION} --hash=sha256:{SDIST_SHA256}\n")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "--require-hashes", "-r", str(req), "-d", str(tmp / "dl")],
                              capture_output=True, text=True, timeout=1800)
        archive = tmp / "dl" / SDIST
        if proc.returncode != 0 or not archive.exists():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise GGUFUnavailable(f"could not fetch {SDIST} (llama.cpp's converter) from the package index: {tail}. "
                                  "Set LORASTUDIO_LLAMA_CPP_SDIST to a copy of that archive on this machine")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise GGUFUnavailable(f"{archive} has sha256 {digest}, not the pinned {SDIST_SHA256} of {SDIST}")
    return archive


def _unpack(archive: Path, dest: Path) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/{VENDORED}"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(CONVERTER_PARTS) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(dest, members=members, filter="data")  # no links, nothing outside dest
    if not (dest / "convert_hf_to_gguf.py").exists():
        raise GGUFUnavailable(f"{SDIST} holds no {VENDORED}convert_hf_to_gguf.py")


# ---------------------------------------------------------------- the converter's registry

def supported_architectures(folder: Path | None = None) -> list[str]:
    """The Hugging Face architectures llama.cpp's converter maps to a GGUF model (TEXT_MODEL_MAP in
    its conversion/__init__.py, read without importing it)."""
    src = ((folder or converter()) / "conversion" / "__init__.py").read_text()
    for node in ast.parse(src).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
            return sorted(ast.literal_eval(node.value))
    raise GGUFUnavailable("llama.cpp's converter has no TEXT_MODEL_MAP: not the pinned release?")


def check_architecture(architectures: list[str] | None, folder: Path | None = None) -> str:
    """The first architecture the converter knows, or a ValueError naming what it lacks."""
    known = set(supported_architectures(folder))
    for arch in architectures or []:
        if arch in known:
            return arch
    raise ValueError(f"llama.cpp's converter ({LLAMA_CPP_VERSION}) cannot convert architecture "
                     f"{', '.join(architectures or ['(none in config.json)'])}: it is not in the converter's registry "
                     f"of {len(known)} architectures; the merged model (safetensors) is the export for it")


# ---------------------------------------------------------------- converting and quantizing

def run_converter(model_dir: Path, out_file: Path, outtype: str, log=print) -> None:
    """convert_hf_to_gguf.py MODEL_DIR --outtype OUTTYPE --outfile OUT, its own gguf-py first on its
    path; every line it prints goes to the log as '[llama.cpp] ...'."""
    script = converter(log) / "convert_hf_to_gguf.py"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must write with its own gguf-py, not another release
    _run_prefixed([sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(out_file)],
                  env, out_file, "llama.cpp's converter")


def quantize(src: Path, dst: Path, qtype: str) -> None:
    """llama.cpp's quantizer in a child process (it prints a line per tensor, straight from C)."""
    if qtype not in QUANT_TYPES:
        raise ValueError(f"GGUF type {qtype!r}: one of {', '.join(TYPES)}")
    _run_prefixed([sys.executable, "-m", "lorastudio.core.gguf_tools", "quantize", str(src), str(dst), qtype],
                  {**os.environ, "PYTHONUNBUFFERED": "1"}, dst, "llama.cpp's quantizer")


def _run_prefixed(cmd: list[str], env: dict, out_file: Path, what: str) -> None:
    """Run CMD; every line it prints goes to this log as '[llama.cpp] ...'."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            errors="replace")
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            print(f"[llama.cpp] {line}", flush=True)
            tail = (tail + [line])[-3:]
    if proc.wait() != 0 or not out_file.exists():
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' | '.join(tail)}")


def _quantize_here(src: str, dst: str, qtype: str) -> int:
    llama_cpp = require()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise ValueError(f"llama.cpp {LLAMA_CPP_VERSION} has no quantization type {qtype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, min(os.cpu_count() or 1, 8))
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", flush=True)
    return 1 if rc != 0 else 0


if __name__ == "__main__":  # python -m lorastudio.core.gguf_tools quantize SRC DST TYPE (quantize() runs it)
    if len(sys.argv) != 5 or sys.argv[1] != "quantize":
        sys.exit("usage: python -m lorastudio.core.gguf_tools quantize SRC DST TYPE")
    sys.exit(_quantize_here(*sys.argv[2:]))
