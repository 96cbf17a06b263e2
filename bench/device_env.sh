# Sourced by the bench/gpu_*.sh scripts on the device: offline, unbuffered, $OUT, the carried
# wheels (.whl: trl, datasets, pydantic, bitsandbytes with its cuda130/cpu libraries only) on
# PYTHONPATH, a throwaway workspace.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PATH="/tmp/site/bin:$PATH"
fi
# The checkout's rooms as the one import package lorastudio (what `pip install -e .` gives locally).
mkdir -p /tmp/lsroot/lorastudio
for room in core webui presets cli; do ln -sfn "$PWD/$room" "/tmp/lsroot/lorastudio/$room"; done
export PYTHONPATH="/tmp/site:$PWD/.whl/site:/tmp/lsroot"
export LORASTUDIO_HOME=/tmp/lshome
