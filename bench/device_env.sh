# Sourced by the bench/gpu_*.sh scripts on the device: offline, unbuffered, $OUT, the carried
# wheels (.whl: trl, datasets, pydantic, bitsandbytes with its cuda130/cpu libraries only) on
# PYTHONPATH, a throwaway workspace.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD/.whl/site:$PWD" PATH="/tmp/site/bin:$PATH"
fi
export LORASTUDIO_HOME=/tmp/lshome
