"""Template tab: the tokenizer's own (auto), a named family, or custom Jinja; a rendered sample with
trained vs masked tokens highlighted (core.labels.encode_example, the one labelling function);
and the core's warnings (EOS not trained, system prompt dropped or injected, differs from own)."""

from __future__ import annotations

import gradio as gr

from .helpers import err_md, error_text, highlight_pieces, parse_sources, readable

# core.template_names.NAMED, spelled out: importing it loads transformers, and building the
# app must not (tests/test_webui_handlers.py checks the two lists agree)
NAMED = ["chatml", "qwen", "llama2", "llama3", "llama3.1", "llama3.2", "mistral", "mistral-v0.1", "gemma", "phi3",
         "zephyr", "vicuna", "alpaca", "deepseek", "internlm2", "smollm", "plain"]


def template_choices() -> list[str]:
    return ["auto"] + NAMED + ["custom"]


def render_template(model: str, template: str, custom_jinja: str = "", data: str = "", fmt: str = "auto",
                    index: int = 0, trust: bool = False) -> dict:
    """{"text", "trained_spans", "n_tokens", "n_trained", "warnings", "template", "source"} for one
    example: row INDEX of the dataset when given, else a built-in two-turn conversation. Rendered
    by core.worker (a custom template is untrusted code: the worker has memory and time limits)."""
    from lorastudio.core import worker

    source = None
    if (data or "").strip():
        source = {"path": readable(parse_sources(data)[0]["path"]), "format": fmt or "auto"}
    model = readable(model or "builtin:tiny")
    return worker.call("render_template", tokenizer=(model, bool(trust)), model=model, template=template or "auto",
                       custom_jinja=custom_jinja if template == "custom" else "", source=source,
                       index=int(index or 0), trust=bool(trust))


def template_view(model, template, custom_jinja, data, fmt, index, trust):
    """-> (highlight pieces, warnings markdown)"""
    try:
        r = render_template(model, template, custom_jinja, data, fmt, index, trust)
    except Exception as e:  # noqa: BLE001
        return [], err_md(e)
    md = f"Template **{r['template']}** · {r['n_tokens']} tokens, {r['n_trained']} trained (highlighted)"
    if r["warnings"]:
        md += "\n\n" + "\n\n".join(f"⚠️ {w}" for w in r["warnings"])
    else:
        md += "\n\nNo warnings."
    return highlight_pieces(r["text"], r["trained_spans"]), md


def own_source(model: str, trust: bool = False) -> str:
    """The tokenizer's own chat template source (to start a custom one from)."""
    from lorastudio.core import worker

    model = readable(model or "builtin:tiny")
    return worker.call("own_template_source", tokenizer=(model, bool(trust)), model=model, trust=bool(trust))


def build(ui: dict) -> None:
    gr.Markdown("How conversations become training text. `auto` keeps the model's own chat template; trained "
                "tokens (assistant answers and their end-of-turn) are highlighted.")
    with gr.Row():
        ui["template"] = gr.Dropdown(template_choices(), value="auto", label="Template")
        ui["template_row"] = gr.Number(value=0, precision=0, label="Dataset row to render (0-based)")
        ui["template_use_data"] = gr.Checkbox(value=True, label="Render a dataset row (else a built-in sample)")
    ui["custom_jinja"] = gr.Code(label="Custom Jinja (template: custom)", language="jinja2", lines=10)
    with gr.Row():
        ui["template_btn"] = gr.Button("Render", variant="primary")
        ui["template_load_own"] = gr.Button("Load the tokenizer's template into the editor")
    ui["template_md"] = gr.Markdown(elem_id="template-warnings")
    ui["template_out"] = gr.HighlightedText(label="Rendered (trained tokens highlighted)", combine_adjacent=True,
                                            color_map={"trained": "green"}, elem_id="template-out")


def wire(ui: dict, demo) -> None:
    def view(model, template, custom_jinja, use_data, data, fmt, index, trust):
        return template_view(model, template, custom_jinja, data if use_data else "", fmt, index, trust)

    inputs = [ui["model"], ui["template"], ui["custom_jinja"], ui["template_use_data"], ui["data"], ui["fmt"],
              ui["template_row"], ui["trust_remote_code"]]
    ui["template_btn"].click(view, inputs, [ui["template_out"], ui["template_md"]], api_name="template")
    ui["template"].change(view, inputs, [ui["template_out"], ui["template_md"]], api_visibility="private")

    def load_own(model, trust):
        try:
            return own_source(model, trust), "custom"
        except Exception as e:  # noqa: BLE001 - a toast, the editor keeps what it has
            gr.Warning(error_text(e))
            return gr.skip(), gr.skip()

    ui["template_load_own"].click(load_own, [ui["model"], ui["trust_remote_code"]],
                                  [ui["custom_jinja"], ui["template"]], api_name="template_source")
