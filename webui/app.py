"""The LoRA Studio web app (Gradio). Importing this module loads no torch: every model or
tokenizer touch happens in core functions called from handlers, training, converting and chat run
in child processes.

One module per tab (tab_model, tab_dataset, tab_template, tab_train, tab_convert, tab_chat, tab_eval): each
has build(ui) that adds its components to the shared `ui` dict, and wire(ui, demo) that connects
events once every tab exists (tabs read each other's inputs: the Dataset tab uses the model from the
Model tab and the template from the Template tab).

Flow a newcomer can follow: Start -> core.runs.launch (child `python -m lorastudio.core.train`) ->
RUN_DIR/metrics.jsonl -> the gr.Timer tick in tab_train reads it -> gr.LinePlot.
"""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from . import tab_chat, tab_convert, tab_dataset, tab_eval, tab_model, tab_template, tab_train
from .helpers import LOSS_COLORS

TABS = [("Model", tab_model), ("Dataset", tab_dataset), ("Template", tab_template), ("Train", tab_train),
        ("Convert", tab_convert), ("Chat", tab_chat), ("Evaluate", tab_eval)]


# Fonts the machine already has: the default theme's web font is fetched from the network, and
# offline the browser falls back glyph by glyph (a capital A from another font in "LoRA").
SANS = ("system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Noto Sans", "Liberation Sans", "Arial",
        "DejaVu Sans", "sans-serif")
MONO = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "DejaVu Sans Mono", "monospace")


def theme() -> gr.themes.Base:
    return gr.themes.Default(font=SANS, font_mono=MONO)


# A line of one point has no length, so vega draws nothing for a single eval loss: every vertex of
# the eval-loss series (its colour in tab_train's color_map) carries a dot.
EVAL_COLOR = LOSS_COLORS["eval_loss"]
CSS = f"""
#loss-plot g.mark-line path[stroke="{EVAL_COLOR}"] {{ marker: url(#eval-dot); }}
#length-hist svg text {{ fill: var(--body-text-color); }}
#length-hist .hist-caption {{ margin: 4px 0 0 52px; font-weight: 600; }}
.hist-empty {{ padding: 12px; color: var(--body-text-color-subdued); }}
"""
MARKERS = (f'<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>'
           f'<marker id="eval-dot" viewBox="0 0 10 10" refX="5" refY="5" markerWidth="8" markerHeight="8" '
           f'markerUnits="userSpaceOnUse"><circle cx="5" cy="5" r="4" fill="{EVAL_COLOR}"/></marker></defs></svg>')


def build() -> gr.Blocks:
    ui: dict = {}
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.HTML(MARKERS, padding=False)
        gr.Markdown("# LoRA Studio\nFine-tune a chat model with LoRA/QLoRA. The embedded tiny model and "
                    "sample dataset work offline.")
        with gr.Tabs():
            for name, mod in TABS:
                with gr.Tab(name, id=name.lower(), elem_id=f"tab-{name.lower()}") as tab:
                    mod.build(ui)
                ui[f"tab_{name.lower()}"] = tab  # a tab that lists checkpoints re-reads them when shown
        with gr.Row(visible=False):  # API-only endpoints (JSON-native twins of UI events)
            ui["api_stats_btn"] = gr.Button("dataset stats api")
            ui["api_preview_btn"] = gr.Button("preview api")
            ui["api_json"] = gr.JSON()
        for _name, mod in TABS:
            mod.wire(ui, demo)
    return demo


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class LaunchError(ValueError):
    pass


def launch(host: str = "127.0.0.1", port: int = 7860, auth: bool | None = None, token: str | None = None,
           allow_dirs: list[str] | tuple[str, ...] = (), share: bool = False,
           credentials: tuple[str, str] | None = None, max_upload_mb: int = 200) -> int:
    """Serve the app. With auth (the default; --no-auth / LORASTUDIO_NO_AUTH=1 turns it off) every
    request needs the access token (webui.auth): printed in the URL at launch, or fixed by
    LORASTUDIO_TOKEN. A public link (--share) or a non-local host needs a username and password
    (--auth USER:PASSWORD): a URL token is not enough once strangers can reach the port.
    Handlers read local paths only inside core.access.allowed_dirs() (+ --allow-dir)."""
    from . import auth as auth_mod

    if (share or host not in LOCAL_HOSTS) and not credentials:
        raise LaunchError(f"{'--share' if share else '--host ' + host} exposes the app beyond this machine: "
                          "it requires --auth USER:PASSWORD")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if allow_dirs:
        extra = [p for p in os.environ.get("LORASTUDIO_ALLOW_DIRS", "").split(os.pathsep) if p]
        os.environ["LORASTUDIO_ALLOW_DIRS"] = os.pathsep.join(extra + [str(Path(d).resolve()) for d in allow_dirs])
    if auth is None:
        auth = os.environ.get("LORASTUDIO_NO_AUTH", "") not in ("1", "true", "yes")
    token = token or os.environ.get("LORASTUDIO_TOKEN") or auth_mod.new_token()
    demo = build()
    if os.environ.get("LORASTUDIO_NO_WARMUP") != "1":
        from lorastudio.core import worker

        worker.warm_up()  # the worker process loads the default tokenizer: the first preview is fast
    kwargs: dict = {"app_kwargs": {"middleware": [auth_mod.middleware(token)]}} if auth and not credentials else {}
    if credentials:
        kwargs["auth"] = [credentials]
    demo.queue(default_concurrency_limit=4).launch(
        theme=theme(), css=CSS,
        server_name=host, server_port=port, show_error=False, quiet=True, share=share,
        max_file_size=f"{max_upload_mb}mb", prevent_thread_lock=True, **kwargs)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if credentials:
        print(f"LoRA Studio: open http://{shown}:{port}/ (log in as {credentials[0]})"
              + (f"; public link: {demo.share_url}" if share else ""), flush=True)
    elif auth:
        print(f"LoRA Studio: open http://{shown}:{port}/?token={token}", flush=True)
    else:
        print(f"LoRA Studio: open http://{shown}:{port}/ (no access token: --no-auth)", flush=True)
    from lorastudio.core import access

    print(f"reads local files only under: {', '.join(map(str, access.allowed_dirs()))} (add more with --allow-dir)",
          flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0
