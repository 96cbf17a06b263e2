#!/usr/bin/env bash
# Every CLI command of the README, as a new user types them, against a NON-editable install in a
# fresh venv, run from outside the checkout (so nothing can come from the source tree).
# Usage: bash bench/readme_commands.sh [VENV]   (default /tmp/lorastudio-readme-venv; built if absent)
# Prints one line per command: ok/FAIL, exit code, seconds, the command.
set -uo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-/tmp/lorastudio-readme-venv}"
WORK="$(mktemp -d -t lorastudio-readme-XXXXXX)"
export LORASTUDIO_HOME="$WORK/home" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
if [ ! -x "$VENV/bin/lorastudio" ]; then
  python3 -m venv "$VENV"
  # a copy of the sources: setuptools writes build/ next to them
  git -C "$SRC" archive HEAD | tar -x -C "$WORK" --one-top-level=src
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0 -c "$SRC/requirements.lock" "$WORK/src" \
    || { echo "FAIL install"; exit 1; }
fi
export PATH="$VENV/bin:$PATH"
cd "$WORK"
fails=0
run() {  # run EXPECTED_EXIT CMD...
  local want=$1; shift
  local t0=$SECONDS out
  out=$("$@" 2>&1); local rc=$?
  if [ "$rc" = "$want" ]; then echo "ok   rc=$rc $((SECONDS - t0))s  $*"; else
    echo "FAIL rc=$rc (wanted $want) $((SECONDS - t0))s  $*"; echo "$out" | tail -5 | sed 's/^/     /'; fails=$((fails + 1)); fi
}
top="$(python -c 'import importlib.metadata as m; print(m.distribution("lorastudio").read_text("top_level.txt").strip())')"
[ "$top" = lorastudio ] && echo "ok   top_level.txt: $top" || { echo "FAIL top_level.txt: $top"; fails=$((fails + 1)); }
run 1 python -c "import core"
run 0 python -c "import lorastudio.core, lorastudio.webui, lorastudio.cli, lorastudio.presets"
run 0 lorastudio --help
run 0 lorastudio list-presets
run 0 lorastudio estimate presets/llama3_1_8b_qlora.yaml --gpu-mem 12GB   # fits (11.1 GiB)
run 0 lorastudio copy-preset tiny_demo my.yaml
run 0 lorastudio train presets/tiny_demo.yaml --set training.max_steps=4 --set training.sample_every=0 --run-dir "$WORK/r1"
run 0 lorastudio train my.yaml --set training.learning_rate=1e-4 --set lora.r=8 --set training.max_steps=30 --detach --run-dir "$WORK/r2"
run 0 lorastudio runs
run 0 lorastudio stop "$WORK/r2"
run 0 lorastudio resume "$WORK/r2"
run 0 lorastudio stop "$WORK/r2"
run 2 lorastudio retry "$WORK/r1"   # done, not failed: refused
run 0 lorastudio preview presets/tiny_demo.yaml -n 2
run 0 lorastudio preview --model builtin:tiny --data builtin:sample --template chatml --json
run 0 lorastudio convert "$WORK/r1"
run 0 lorastudio convert "$WORK/r1" --merge --dtype fp32
run 0 lorastudio chat "$WORK/r1" --prompt "What is your name?" --greedy
run 0 lorastudio chat "$WORK/r1/merged" --prompt "What is your name?" --greedy
# bare `lorastudio` launches the app on the embedded default and answers on 127.0.0.1
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LORASTUDIO_TOKEN=readme setsid lorastudio webui --port "$PORT" > "$WORK/app.log" 2>&1 &
APP=$!
for _ in $(seq 90); do curl -sf -o /dev/null -H "Authorization: Bearer readme" "http://127.0.0.1:$PORT/config" && break; sleep 1; done
run 0 curl -sf -o /dev/null -H "Authorization: Bearer readme" "http://127.0.0.1:$PORT/config"
run 22 curl -sf -o /dev/null "http://127.0.0.1:$PORT/config"  # no token: refused
kill -TERM -- -"$APP" 2>/dev/null
echo "failures: $fails  (workspace $WORK)"
exit "$fails"
