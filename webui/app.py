"""The LoRA Studio web app (Gradio). Importing this module loads no torch: every model or
tokenizer touch happens in core functions called from handlers, and training runs in a child.

Flow a newcomer can follow: Start -> core.runs.launch (child `python -m core.train`) ->
RUN_DIR/metrics.jsonl -> the gr.Timer tick below reads new lines -> gr.LinePlot.
"""

from __future__ import annotations

import os

import gradio as gr

from . import helpers


def build() -> gr.Blocks:
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown("# LoRA Studio\nFine-tune a chat model with LoRA/QLoRA. The embedded tiny model and "
                    "sample dataset work offline.")
        with gr.Tab("Dataset"):
            with gr.Row():
                model_box = gr.Textbox(value="builtin:tiny", label="Model (folder, hub id or builtin:tiny)")
                data_box = gr.Textbox(value="builtin:sample", label="Dataset file")
                template_box = gr.Textbox(value="auto", label="Template (auto or a name)")
            n_box = gr.Slider(1, 20, value=3, step=1, label="Samples")
            preview_btn = gr.Button("Preview", variant="primary")
            preview_status = gr.Markdown()
            preview_out = gr.HighlightedText(label="Rendered as training sees it (trained tokens highlighted)",
                                             combine_adjacent=True, color_map={"trained": "green"})
            preview_btn.click(helpers.preview_highlight, [model_box, data_box, template_box, n_box],
                              [preview_out, preview_status], api_name="preview")
        with gr.Tab("Train"):
            preset_box = gr.Dropdown(helpers.preset_names(), value="tiny_smoke", label="Preset")
            start_btn = gr.Button("Start", variant="primary")
            stop_btn = gr.Button("Stop")
            run_box = gr.Textbox(label="Run directory", interactive=False)
            run_status = gr.Markdown()
            loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=300)
            log_box = gr.Textbox(label="Log tail", lines=10, interactive=False)
            start_btn.click(helpers.start_preset, [preset_box], [run_box, run_status], api_name="start")
            stop_btn.click(helpers.stop_run, [run_box], [run_status], api_name="stop")
            timer = gr.Timer(1.0)
            timer.tick(helpers.poll_run, [run_box], [loss_plot, run_status, log_box])
            demo.load(helpers.latest_run, None, [run_box])
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build()
    demo.queue().launch(server_name=host, server_port=port, show_error=False)
    return 0
