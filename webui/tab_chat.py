"""Chat tab: the base model, a run (base + adapter, any checkpoint) or a merged folder, served by the
core's chat worker (a child process: no model in the UI process); streaming replies; system prompt
and generation settings; side by side: base vs fine-tuned on the same prompt (one run worker
answers both, the base through the adapter switched off)."""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from lorastudio.core import runs

from .helpers import error_text

MAX_WORKERS = 2
_workers: dict[tuple[str, int | None], tuple[object, threading.Lock]] = {}
_registry_lock = threading.Lock()


# ---------------------------------------------------------------- targets and workers

def target_choices() -> list[str]:
    """builtin:tiny, every run with an adapter, every merged folder and GGUF export, newest runs first."""
    from .tab_convert import checkpoint_choices

    out = ["builtin:tiny"]
    for info in runs.list_runs():
        d = info["run_dir"]
        if checkpoint_choices(d):
            out.append(d)
        out += [str(p) for p in sorted(Path(d).glob("merged*")) if p.is_dir() and not p.name.endswith(".partial")]
        out += [str(p) for p in sorted(Path(d).glob("gguf-*/model-*.gguf")) if not p.parent.name.endswith(".partial")]
    return out


def is_run(target: str) -> bool:
    return bool(target) and (Path(target) / "config.yaml").exists()


def base_of(target: str) -> str | None:
    """The base model of a run or a merged/exported folder (its lorastudio.json); for a GGUF export,
    the merged model it was made from (side by side: the merge on the left, llama.cpp on the right)."""
    if is_run(target):
        from lorastudio.core import history

        return (history.load_config_dict(target).get("model") or {}).get("name_or_path")
    from lorastudio.core import safe_io

    gguf = str(target).lower().endswith(".gguf")
    try:
        meta = safe_io.read_json((Path(target).parent if gguf else Path(target)) / "lorastudio.json", 1 << 20)
    except safe_io.FileProblem:
        return None
    base = meta.get("merged_model" if gguf else "base_model") if isinstance(meta, dict) else None
    return base if isinstance(base, str) else None


def parent_of(target: str) -> tuple[str, str] | None:
    """(run dir, "final" or "checkpoint-N") of the SFT run a run continued (model.adapter_from:
    a preference run's parent, core/stage.py), None for a run started from the base."""
    if not is_run(target):
        return None
    from lorastudio.core import safe_io

    try:
        cfg = safe_io.read_yaml(Path(target) / "config.yaml") or {}
    except safe_io.FileProblem:
        return None
    adapter = (cfg.get("model") or {}).get("adapter_from") if isinstance(cfg, dict) else None
    if not isinstance(adapter, str) or not adapter:
        return None
    folder = Path(adapter)
    if folder.name.startswith("checkpoint-"):
        return str(folder.parent), folder.name
    return (str(folder.parent), "final") if folder.name == "adapter" else (str(folder), "final")


def _ckpt(checkpoint: str | None) -> int | None:
    if not checkpoint or checkpoint == "final":
        return None
    tail = str(checkpoint).split("-")[-1]
    if not tail.isdigit() or len(tail) > 12:
        raise ValueError(f"checkpoint {checkpoint!r}: final or checkpoint-N")
    return int(tail)


def get_worker(target: str, checkpoint: int | None = None):
    """A live ChatWorker for (target, checkpoint), started on first use; at most MAX_WORKERS kept."""
    from lorastudio.core.chat import ChatError, ChatWorker

    from .helpers import readable, workspace_run
    from .tab_convert import checkpoint_choices

    if not target:
        raise ChatError("pick a model or run to chat with")
    target = readable(target)
    if is_run(target):  # a run's config.yaml decides what loads (trust_remote_code too): ours only
        target = workspace_run(target)
        if checkpoint is not None and f"checkpoint-{checkpoint}" not in checkpoint_choices(target):
            raise ChatError(f"{Path(target).name} has no checkpoint-{checkpoint}")
    key = (target, checkpoint if is_run(target) else None)
    with _registry_lock:
        entry = _workers.get(key)
        if entry and entry[0].proc.poll() is not None:  # died: start again
            _workers.pop(key, None)
            entry = None
        if entry is None:
            # a run worker switches checkpoints in place instead of loading the base again
            same_run = next((k for k in _workers if k[0] == target and is_run(target)), None)
            if same_run is not None:
                worker, lock = _workers.pop(same_run)
                with lock:
                    worker.set_checkpoint(checkpoint)
                entry = (worker, lock)
            else:
                while len(_workers) >= MAX_WORKERS:
                    old_key = next(iter(_workers))
                    old, _ = _workers.pop(old_key)
                    old.close()
                entry = (ChatWorker(target, checkpoint=key[1], device="auto"), threading.Lock())
            _workers[key] = entry
        else:  # most recently used last
            _workers[key] = _workers.pop(key)
    return entry


def close_workers() -> str:
    with _registry_lock:
        items = list(_workers.values())
        _workers.clear()
    for worker, _ in items:
        worker.close()
    return f"unloaded {len(items)} model(s)"


# ---------------------------------------------------------------- messages

def _text(content, depth: int = 0) -> str:
    """Chatbot content arrives as a string or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if depth > 8:  # parts of parts of parts: no chat client sends that
        return ""
    if isinstance(content, dict):
        return _text(content.get("text") or content.get("content") or "", depth + 1)
    if isinstance(content, (list, tuple)):
        return "".join(_text(p, depth + 1) for p in content)
    return "" if content is None else str(content)


def to_messages(history: list | None) -> list[dict]:
    out = []
    for m in history or []:
        if isinstance(m, dict) and m.get("role") in ("user", "assistant"):
            out.append({"role": m["role"], "content": _text(m.get("content"))})
    return out


def gen_kwargs(temperature, top_p, max_new_tokens, greedy) -> dict:
    from .helpers import number, whole

    return dict(temperature=number(temperature or 0, "Temperature", 0, 5), top_p=number(top_p or 1.0, "Top-p", 0, 1),
                max_new_tokens=whole(max_new_tokens or 64, "Max new tokens", 1, 4096), greedy=bool(greedy))


MAX_CHAT_CHARS = 200_000  # a conversation sent to the model (a long paste, not a book)


def stream_answer(target, checkpoint, messages, system=None, use_adapter=True, **gen):
    """Yield the growing reply text (the data the Chatbot shows)."""
    from lorastudio.core.chat import ChatError

    size = sum(len(m["content"]) for m in messages) + len(system or "")
    if size > MAX_CHAT_CHARS:
        raise ChatError(f"the conversation is {size:,} characters; at most {MAX_CHAT_CHARS:,} (Clear starts anew)")
    worker, lock = get_worker(target, _ckpt(checkpoint))
    text = ""
    with lock:
        for chunk in worker.stream(messages, system=system or None, use_adapter=use_adapter, **gen):
            text += chunk
            yield text


# ---------------------------------------------------------------- handlers

def chat(message, history, target, checkpoint, mode, system, temperature, top_p, max_new_tokens, greedy):
    """Streaming chat: yields (chat history, cleared input box)."""
    history = to_messages(history)
    message = _text(message).strip()
    if not message:
        yield history, ""
        return
    history = history + [{"role": "user", "content": message}]
    yield history + [{"role": "assistant", "content": "…"}], ""
    try:
        reply = ""
        for reply in stream_answer(target, checkpoint, history, system, mode != "base",
                                   **gen_kwargs(temperature, top_p, max_new_tokens, greedy)):
            yield history + [{"role": "assistant", "content": reply}], ""
        if not reply:
            yield history + [{"role": "assistant", "content": "(empty reply)"}], ""
    except Exception as e:  # noqa: BLE001
        yield history + [{"role": "assistant", "content": f"⚠️ {error_text(e)}"}], ""


def compare(prompt, target, checkpoint, system, temperature, top_p, max_new_tokens, greedy, left_side="base"):
    """Side by side on the same prompt: (left history, right history), streamed one after the
    other. Left is the base (a run answers with its adapter off; a merged folder is compared with
    its base model), "parent" (the SFT run a preference run continued) or, for a run, another
    checkpoint; right is `checkpoint`."""
    prompt = _text(prompt).strip()
    if not prompt:
        yield [], []
        return
    user = [{"role": "user", "content": prompt}]
    gen = gen_kwargs(temperature, top_p, max_new_tokens, greedy)
    left, right = user + [{"role": "assistant", "content": "…"}], list(user)
    yield left, right
    try:
        if left_side == "parent":  # a preference run against the SFT run it continued
            parent = parent_of(target)
            if parent is None:
                raise ValueError("this run continues no other run (model.adapter_from): compare with the base")
            base_stream = stream_answer(parent[0], parent[1], user, system, True, **gen)
        elif is_run(target) and left_side and left_side != "base":
            base_stream = stream_answer(target, left_side, user, system, True, **gen)
        elif is_run(target):
            base_stream = stream_answer(target, checkpoint, user, system, False, **gen)
        else:
            base = base_of(target)
            if not base:
                raise ValueError("side by side needs a run or a merged folder (to know its base model)")
            base_stream = stream_answer(base, None, user, system, True, **gen)
        reply = ""
        for reply in base_stream:
            left = user + [{"role": "assistant", "content": reply}]
            yield left, right
        left = user + [{"role": "assistant", "content": reply or "(empty reply)"}]
        right = user + [{"role": "assistant", "content": "…"}]
        yield left, right
        reply = ""
        for reply in stream_answer(target, checkpoint, user, system, True, **gen):
            right = user + [{"role": "assistant", "content": reply}]
            yield left, right
        right = user + [{"role": "assistant", "content": reply or "(empty reply)"}]
        yield left, right
    except Exception as e:  # noqa: BLE001
        msg = {"role": "assistant", "content": f"⚠️ {error_text(e)}"}
        yield (left if left[-1]["content"] != "…" else user + [msg]), user + [msg]


def chat_api(message: str, target: str, checkpoint: str, mode: str, system: str, temperature: float,
             top_p: float, max_new_tokens: float, greedy: bool) -> dict:
    """Blocking JSON-native chat (api_name="chat_once"): {"reply"} or {"error"}."""
    try:
        reply = ""
        for reply in stream_answer(target, checkpoint, [{"role": "user", "content": message}], system,
                                   mode != "base", **gen_kwargs(temperature, top_p, max_new_tokens, greedy)):
            pass
        return {"reply": reply}
    except Exception as e:  # noqa: BLE001
        return {"error": error_text(e)}


# ---------------------------------------------------------------- UI

def build(ui: dict) -> None:
    gr.Markdown("Chat with the base model, a run (any checkpoint), a merged model or a GGUF export (llama.cpp "
                "on CPU; side by side puts the merged model it came from on the left). The model runs in a "
                "separate worker process.")
    with gr.Row():
        ui["ch_target"] = gr.Dropdown(["builtin:tiny"], value="builtin:tiny", allow_custom_value=True, scale=3,
                                      label="Model, run, merged folder or GGUF", elem_id="chat-target")
        ui["ch_ckpt"] = gr.Dropdown(["final"], value="final", allow_custom_value=True, label="Checkpoint", scale=1,
                                    elem_id="ch-ckpt")
        ui["ch_mode"] = gr.Radio(["fine-tuned", "base"], value="fine-tuned", label="Adapter", scale=1)
        ui["ch_refresh"] = gr.Button("↻", scale=0, min_width=40, elem_id="ch-refresh")
    with gr.Accordion("System prompt and generation settings", open=False):
        ui["ch_system"] = gr.Textbox(label="System prompt", lines=2)
        with gr.Row():
            ui["ch_temp"] = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
            ui["ch_top_p"] = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
            ui["ch_max"] = gr.Slider(1, 1024, value=64, step=1, label="Max new tokens")
            ui["ch_greedy"] = gr.Checkbox(value=True, label="Greedy (deterministic)")
    with gr.Tab("Chat"):
        ui["ch_bot"] = gr.Chatbot(label="Chat", height=320, elem_id="chat-bot")
        with gr.Row():
            ui["ch_msg"] = gr.Textbox(placeholder="Message", show_label=False, scale=4, elem_id="chat-msg")
            ui["ch_send"] = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            ui["ch_clear"] = gr.Button("Clear", scale=0)
    with gr.Tab("Side by side", elem_id="tab-side-by-side"):
        with gr.Row():
            ui["cmp_prompt"] = gr.Textbox(placeholder="Prompt for both", show_label=False, scale=4,
                                          elem_id="cmp-prompt")
            ui["cmp_btn"] = gr.Button("Compare", variant="primary", scale=1, elem_id="cmp-btn")
        ui["cmp_left_side"] = gr.Dropdown(["base"], value="base", allow_custom_value=True, label="Left side: the base, the parent run, or another checkpoint "
                                          "(right side: the checkpoint chosen above)", elem_id="cmp-left-side")
        with gr.Row():
            # grow with the answers (a fixed height cut a long bubble off), scroll past max_height
            ui["cmp_left"] = gr.Chatbot(label="Left (base or checkpoint)", height=None, min_height=200, max_height=560,
                                        elem_id="cmp-left")
            ui["cmp_right"] = gr.Chatbot(label="Fine-tuned", height=None, min_height=200, max_height=560,
                                         elem_id="cmp-right")
    ui["ch_unload"] = gr.Button("Unload models")
    ui["ch_md"] = gr.Markdown()
    with gr.Row(visible=False):
        ui["api_chat_btn"] = gr.Button("chat api")
        ui["api_chat_json"] = gr.JSON()


def wire(ui: dict, demo) -> None:
    from .tab_convert import checkpoint_choices

    def on_target(target, current=None):
        ck = (checkpoint_choices(target) if is_run(target) else []) or ["final"]  # read now, never kept
        return gr.Dropdown(choices=ck, value=current if current in ck else ck[0])  # "final" first when done

    def left_choices(target, current=None):
        ck = ["base"] + (["parent"] if parent_of(target) else [])  # parent: the SFT run a preference run continued
        ck += checkpoint_choices(target) if is_run(target) else []
        return gr.Dropdown(choices=ck, value=current if current in ck else "base")

    def refresh(current=None, ckpt=None, left=None):
        choices = target_choices()
        value = current if current in choices else (next((c for c in choices if is_run(c)), choices[0]))
        return gr.Dropdown(choices=choices, value=value), on_target(value, ckpt), left_choices(value, left)

    # every list is read from disk when it can be seen: the tab shown, a dropdown opened, after a
    # reply (save_total_limit deletes checkpoints while a run trains; a deleted one is never offered)
    shown = [ui["ch_target"], ui["ch_ckpt"], ui["cmp_left_side"]]
    quiet = dict(api_visibility="private", show_progress="hidden")
    ui["ch_refresh"].click(refresh, shown, shown, api_visibility="private")
    ui["tab_chat"].select(refresh, shown, shown, api_visibility="private")
    demo.load(lambda: refresh(None), None, shown, api_visibility="private")
    # opening the target list refreshes its choices only: what is typed in it (a folder) stays
    ui["ch_target"].focus(lambda: gr.Dropdown(choices=target_choices()), None, [ui["ch_target"]], **quiet)
    ui["ch_ckpt"].focus(on_target, [ui["ch_target"], ui["ch_ckpt"]], [ui["ch_ckpt"]], **quiet)
    ui["cmp_left_side"].focus(left_choices, [ui["ch_target"], ui["cmp_left_side"]], [ui["cmp_left_side"]], **quiet)
    ui["ch_target"].change(on_target, [ui["ch_target"]], [ui["ch_ckpt"]], api_visibility="private")

    ui["ch_target"].change(left_choices, [ui["ch_target"]], [ui["cmp_left_side"]], api_visibility="private")
    gen = [ui["ch_system"], ui["ch_temp"], ui["ch_top_p"], ui["ch_max"], ui["ch_greedy"]]
    chat_in = [ui["ch_msg"], ui["ch_bot"], ui["ch_target"], ui["ch_ckpt"], ui["ch_mode"]] + gen
    ui["ch_send"].click(chat, chat_in, [ui["ch_bot"], ui["ch_msg"]], api_name="chat").then(
        refresh, shown, shown, **quiet)
    ui["ch_msg"].submit(chat, chat_in, [ui["ch_bot"], ui["ch_msg"]], api_visibility="private").then(
        refresh, shown, shown, **quiet)
    ui["ch_clear"].click(lambda: [], None, [ui["ch_bot"]], api_visibility="private")
    ui["cmp_btn"].click(compare, [ui["cmp_prompt"], ui["ch_target"], ui["ch_ckpt"]] + gen + [ui["cmp_left_side"]],
                        [ui["cmp_left"], ui["cmp_right"]], api_name="compare").then(refresh, shown, shown, **quiet)
    ui["ch_unload"].click(close_workers, None, [ui["ch_md"]], api_name="unload")
    ui["api_chat_btn"].click(chat_api, [ui["ch_msg"], ui["ch_target"], ui["ch_ckpt"], ui["ch_mode"]] + gen,
                             [ui["api_chat_json"]], api_name="chat_once")
