"""Chat with a base model, a run (base + adapter, any checkpoint), a merged model or a GGUF export.

    load_chat_model(target)  -> (model, tokenizer, template)   the run's own template, never a guess
    core.generate.stream(...) -> text chunks (the one generation path, training's samples too)
    ChatWorker(target)       -> the same in a child process the UI talks to; close() frees it all

A run is loaded as a PeftModel: checkpoints are extra adapters (load_adapter/set_adapter), and
`use_adapter=False` answers with the base through `disable_adapter()`, from the same weights.
A tokenizer without a chat template gets plain completion (prompt = the messages' text).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from . import convert, runs, workspace

COMPLETION_NOTICE = "this model has no chat template: plain completion (the prompt is the messages' text)"


class ChatError(ValueError):
    """The target can't be chatted with, or the worker failed / died / timed out."""


# ---------------------------------------------------------------- loading

def is_run_dir(target: str | Path) -> bool:
    p = Path(target)
    return p.is_dir() and (p / "config.yaml").exists() and (
        (p / "adapter").is_dir() or (p / "model").is_dir() or runs.last_checkpoint(p) is not None)


def checkpoints(run_dir: str | Path) -> list[int]:
    """Steps of the checkpoints that hold an adapter (core.runs.checkpoints, read now)."""
    return [c.step for c in runs.checkpoints(run_dir) if c.adapter]


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def adapter_name(checkpoint: int | None) -> str:
    return "final" if checkpoint is None else f"checkpoint-{checkpoint}"


def load_chat_model(target: str | Path, checkpoint: int | None = None, device: str = "auto"):
    """(model, tokenizer, template or None). TARGET: a run dir, a merged/model folder, a GGUF
    export (core.gguf_chat), a hub id or builtin:tiny."""
    from . import model as model_lib

    target = str(target)
    from . import gguf_chat

    if gguf_chat.is_gguf(target):  # a GGUF export: llama.cpp on CPU, the run's tokenizer and template
        if checkpoint is not None:
            raise ChatError("a GGUF file is one checkpoint already: no --checkpoint for it")
        return gguf_chat.load(target)
    device = pick_device(device)
    if is_run_dir(target):
        cfg = convert.run_config(target)
        if cfg.method == "full":  # a full fine-tune saved a whole model: chat with it as a folder
            return _load_folder(Path(target) / "model", device, cfg.model.trust_remote_code)
        tokenizer, template, _ = convert.run_tokenizer(target)
        from peft import PeftModel

        # a QLoRA adapter is applied to the 4-bit base it was trained on (bitsandbytes)
        dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        base = convert.load_base(cfg, dtype, device, tokenizer, quantized=cfg.method == "qlora")
        src = convert.adapter_dir(target, checkpoint)
        model = PeftModel.from_pretrained(base, str(src), adapter_name=adapter_name(checkpoint))
        model.eval()
        model.lorastudio_run_dir = str(Path(target).resolve())  # for set_checkpoint
        return model, tokenizer, template
    try:
        path = model_lib.resolve_path(target)
        model_lib._check_local(path)
    except model_lib.ModelError as e:
        raise ChatError(str(e).replace("model.name_or_path: ", "")) from None
    return _load_folder(path, device)


def _load_folder(path, device: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    from . import model as model_lib

    try:
        tokenizer, template, _ = convert.folder_tokenizer(path, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", trust_remote_code=trust_remote_code)
    except (OSError, model_lib.ModelError) as e:
        raise ChatError(f"cannot load a model from {path}: {e}") from None
    return model.to(device).eval(), tokenizer, template


def set_checkpoint(model, checkpoint: int | None) -> str:
    """Switch a run's PeftModel to adapter/ (None) or checkpoint-N, loading it on first use."""
    run_dir = getattr(model, "lorastudio_run_dir", None)
    if run_dir is None:
        raise ChatError("checkpoints can be switched only when chatting with a run directory")
    name = adapter_name(checkpoint)
    if name not in model.peft_config:
        model.load_adapter(str(convert.adapter_dir(run_dir, checkpoint)), adapter_name=name)
    model.set_adapter(name)
    model.eval()
    return name


def describe(model, tokenizer, template, target, checkpoint=None) -> dict:
    run_dir = getattr(model, "lorastudio_run_dir", None)
    return {"target": str(target), "kind": "run" if run_dir else "model", "checkpoint": checkpoint,
            "checkpoints": checkpoints(run_dir) if run_dir else [],
            "adapters": list(getattr(model, "peft_config", {}) or {}),
            "template": template.name if template is not None else None,
            "eot_token": template.eot(tokenizer) if template is not None else tokenizer.eos_token,
            "completion_mode": template is None, "notice": COMPLETION_NOTICE if template is None else None,
            "device": "cpu (llama.cpp)" if getattr(model, "is_gguf", False) else str(next(model.parameters()).device),
            "pid": os.getpid()}


# ---------------------------------------------------------------- the worker, seen from the parent

class ChatWorker:
    """A chat model in a child process (`python -m lorastudio.core.chat_worker`): own process group, output to
    a log file, requests and replies over multiprocessing.connection (127.0.0.1, random authkey).

    The worker loads the model, listens, and writes its port to a ready file; every wait on it is
    bounded and watches the process, so a dead or hung worker is a ChatError, never a hang."""

    def __init__(self, target, checkpoint: int | None = None, device: str = "auto", load_timeout: float = 900,
                 reply_timeout: float = 600):
        from multiprocessing.connection import Client

        self.reply_timeout = reply_timeout
        folder = workspace.home() / "chat" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        folder.mkdir(parents=True)
        self.log_path, ready = folder / "worker.log", folder / "ready.json"
        authkey = secrets.token_bytes(32)
        cmd = [sys.executable, "-m", "lorastudio.core.chat_worker", str(target), "--ready", str(ready), "--device", device,
               "--parent-pid", str(os.getpid())] + (["--checkpoint", str(checkpoint)] if checkpoint is not None else [])
        # the key goes through the environment, not argv (which any local user can read)
        self.proc = runs.spawn(cmd, self.log_path, env={"LORASTUDIO_CHAT_AUTHKEY": authkey.hex()})
        deadline = time.time() + load_timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise ChatError(f"chat worker exited while loading ({self.proc.returncode}): {self._tail()}")
            if time.time() > deadline:
                self._kill()
                raise ChatError(f"chat worker did not load within {load_timeout:.0f}s: {self._tail()}")
            time.sleep(0.1)
        hello = json.loads(ready.read_text())
        if "error" in hello:
            self.proc.wait(30)
            raise ChatError(hello["error"])
        self.conn = Client(("127.0.0.1", hello["port"]), authkey=authkey)

    def _tail(self, n: int = 5) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return " | ".join(lines[-n:])

    def _recv(self):
        deadline = time.time() + self.reply_timeout
        while not self.conn.poll(0.2):
            if self.proc.poll() is not None:
                raise ChatError(f"chat worker died ({self.proc.returncode}): {self._tail()}")
            if time.time() > deadline:
                raise ChatError(f"chat worker did not answer within {self.reply_timeout:.0f}s")
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            raise ChatError(f"chat worker died: {self._tail()}") from None
        if kind == "error":
            raise ChatError(value)
        return kind, value

    def _call(self, *request):
        if self.proc.poll() is not None:
            raise ChatError(f"chat worker is not running (exit {self.proc.returncode})")
        try:
            self.conn.send(request)
        except (OSError, ValueError):
            raise ChatError(f"chat worker died: {self._tail()}") from None
        return self._recv()[1]

    def stream(self, messages: list[dict], system: str | None = None, use_adapter: bool = True, **gen):
        """Yield reply chunks; stopping early tells the worker to cancel the generation."""
        self._call("stream", dict(messages=messages, system=system, use_adapter=use_adapter, **gen))
        done = False
        try:
            while True:
                kind, value = self._recv()
                if kind == "end":
                    done = True
                    return
                yield value
        finally:
            if not done and self.proc.poll() is None:
                self.conn.send(("cancel",))
                with contextlib.suppress(ChatError):
                    while self._recv()[0] != "end":  # drain what was already sent
                        pass

    def reply(self, messages, **kw) -> str:
        return "".join(self.stream(messages, **kw)).strip()

    def set_checkpoint(self, checkpoint: int | None) -> dict:
        return self._call("set_checkpoint", checkpoint)

    def info(self) -> dict:
        return self._call("info")

    def close(self, timeout: float = 30) -> None:
        """The worker exits (its memory, GPU memory included, goes with it)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ChatError, OSError, ValueError):
                self.conn.send(("close",))
            try:
                self.proc.wait(timeout)
            except Exception:  # noqa: BLE001 - did not exit in time: kill its group
                self._kill()
        with contextlib.suppress(AttributeError, OSError):
            self.conn.close()

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
