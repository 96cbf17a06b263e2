"""The chat worker child: `python -m lorastudio.core.chat_worker TARGET --ready FILE [--checkpoint N]`.

Started by `core.chat.ChatWorker` (own process group, output to a log file). Loads the model,
listens on 127.0.0.1 (random port; authkey from $LORASTUDIO_CHAT_AUTHKEY), writes
{"port": ...} or {"error": ...} to the ready file, then serves one client:

    ("stream", kwargs)        -> ("ok", None), ("chunk", text)*, ("end", None); ("cancel",) stops it
                                 (a cancel that arrives after the end gets no answer)
    ("set_checkpoint", n)     -> ("ok", info)
    ("info",)                 -> ("ok", info)
    ("close",)                -> ("ok", None), then exit
    any failure               -> ("error", message); the worker keeps serving

It exits when the client disconnects or the parent process dies, so a model is never orphaned.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path


def log(msg: str) -> None:
    print(f"[lorastudio chat {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _write_ready(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # the parent never reads half a file


def _watch_parent(pid: int) -> None:
    import psutil

    while psutil.pid_exists(pid):
        time.sleep(2)
    log(f"parent {pid} is gone: exiting")
    os._exit(0)


def serve(conn, model, tokenizer, template, target, checkpoint) -> None:
    from . import chat, generate

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            log("client disconnected: exiting")
            return
        kind = request[0]
        try:
            if kind == "close":
                conn.send(("ok", None))
                return
            if kind == "info":
                conn.send(("ok", chat.describe(model, tokenizer, template, target, checkpoint)))
            elif kind == "set_checkpoint":
                chat.set_checkpoint(model, request[1])  # on failure the current adapter stays
                checkpoint = request[1]
                log(f"using {chat.adapter_name(checkpoint)}")
                conn.send(("ok", chat.describe(model, tokenizer, template, target, checkpoint)))
            elif kind == "stream":
                conn.send(("ok", None))
                chunks = generate.stream(model, tokenizer, template, **request[1])
                for chunk in chunks:
                    if conn.poll(0) and conn.recv()[0] == "cancel":
                        chunks.close()  # stops the generation thread
                        break
                    conn.send(("chunk", chunk))
                conn.send(("end", None))
            elif kind == "cancel":
                pass  # arrived after the reply's "end" (which the client drained): no answer
            else:
                conn.send(("error", f"unknown request {kind!r}"))
        except (EOFError, OSError, BrokenPipeError):
            log("client disconnected: exiting")
            return
        except Exception as e:  # noqa: BLE001 - report to the client, keep serving
            log(f"{kind} failed: {type(e).__name__}: {e}")
            conn.send(("error", str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorastudio.core.chat_worker")
    ap.add_argument("target")
    ap.add_argument("--ready", required=True)
    ap.add_argument("--checkpoint", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--parent-pid", type=int)
    a = ap.parse_args(argv)
    from .child import quiet_libraries

    quiet_libraries()  # before the model's libraries are imported: their chatter as quiet log lines
    ready = Path(a.ready)
    if a.parent_pid:
        threading.Thread(target=_watch_parent, args=(a.parent_pid,), daemon=True).start()
    authkey = bytes.fromhex(os.environ.pop("LORASTUDIO_CHAT_AUTHKEY"))
    try:
        from . import chat, machine

        if machine.device_for(a.device) == "cpu":
            machine.limit_memory("cpu_job")  # a model too big for this machine fails here, alone
        if chat.pick_device(a.device) == "cuda" and not a.target.lower().endswith(".gguf"):  # GGUF: llama.cpp on CPU
            # a chat model on the GPU is a GPU job: refuse (rather than OOM a training run) while
            # another job holds the card; the lock is released when this worker exits
            from .locks import DeviceLock

            DeviceLock("cuda", "chat", a.target).acquire(wait=False)
        log(f"loading {a.target}" + (f" checkpoint {a.checkpoint}" if a.checkpoint is not None else ""))
        model, tokenizer, template = chat.load_chat_model(a.target, a.checkpoint, a.device)
        if template is None:
            log(chat.COMPLETION_NOTICE)
    except Exception as e:  # noqa: BLE001 - the parent shows this one line
        from .locks import Busy

        expected = isinstance(e, (ValueError, Busy))  # bad input or a busy card: the sentence says it all
        if not expected:
            import traceback

            traceback.print_exc()  # a bug: the log keeps where it happened
        msg = str(e) if expected else f"{type(e).__name__}: {e}"
        log(f"FAILED: {msg}")
        _write_ready(ready, {"error": msg})
        return 2
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    _write_ready(ready, {"port": listener.address[1], "pid": os.getpid()})
    log(f"ready on port {listener.address[1]}")
    try:
        conn = listener.accept()
    except Exception as e:  # noqa: BLE001 - a client with the wrong key, for instance
        log(f"accept failed: {e}")
        return 1
    listener.close()  # one client per worker
    serve(conn, model, tokenizer, template, a.target, a.checkpoint)
    conn.close()
    log("exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
