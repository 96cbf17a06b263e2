#!/usr/bin/env bash
# Builds the two wheel folders the device calls carry (the device has torch, transformers 5.17,
# accelerate, huggingface_hub and no registry; see bench/device_env.sh):
#   .whl/   the project's own pins of what the device lacks or has older (trl, datasets, pydantic,
#           transformers, peft, liger-kernel, py-spy ...), bitsandbytes unpacked in .whl/site with
#           only its cpu and cuda130 libraries (the full wheel is ~60 MB of other CUDA versions)
#   .peer/  Unsloth's harness from ../shared/peers and its wheels in .peer/w (its own trl 1.15 and
#           datasets 4.8: Unsloth refuses ours), unsloth repacked without studio/ (its web UI)
# Run here, in the repo root, with a registry:  bash bench/device_wheels.sh   (~1 min, ~42 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.peer/\n/.bench/\n' >> .git/info/exclude
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64)
pin() { grep -i "^$1==" requirements.lock | head -1; }
get() { python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$1" "${@:2}"; }

rm -rf .whl && mkdir -p .whl
get .whl $(for p in trl datasets pydantic pydantic_core annotated-types typing-inspection transformers \
  peft dill multiprocess xxhash typer regex; do pin $p; done) liger-kernel==0.8.5 py-spy==0.4.1
get /tmp/bnb.$$ "$(pin bitsandbytes)"
mkdir -p .whl/site && python3 -m zipfile -e /tmp/bnb.$$/bitsandbytes-*.whl .whl/site && rm -rf /tmp/bnb.$$
find .whl/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete

rm -rf .peer && mkdir -p .peer/w
cp ../shared/peers/unsloth_sft.py .peer/
get .peer/w unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 torchao==0.18.0 \
  tyro docstring_parser typeguard shtab cut_cross_entropy msgspec hf_transfer json5 nest_asyncio structlog einops
python3 - <<'EOF'  # unsloth without studio/: its RECORD rewritten so pip installs the rest
import glob, zipfile, os
src = glob.glob(".peer/w/unsloth-2026*.whl")[0]; tmp = src + ".tmp"
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
    for item in zi.infolist():
        if item.filename.startswith("studio/") or "/studio/" in item.filename.split(".dist-info")[0]:
            continue
        data = zi.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if b"studio/" not in l)
        zo.writestr(item, data)
os.replace(tmp, src)
EOF
du -sh .whl .peer
