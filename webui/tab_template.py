"""Template tab: the tokenizer's own (auto), a named family, or custom Jinja; a rendered sample with
trained vs masked tokens highlighted (core.labels.encode_example, the one labelling function);
and the core's warnings (EOS not trained, system prompt dropped or injected, differs from own)."""

from __future__ import annotations

import re

import gradio as gr

from .helpers import err_md, highlight_pieces, parse_sources, readable

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


_TAG = re.compile(r"\{([%{#])")
_CLOSE = {"%": "%}", "{": "}}", "#": "#}"}
_OPENS = ("for", "if", "macro", "call", "filter", "generation", "block", "with")
_MIDS = ("elif", "else")


def _tags(src: str) -> list[tuple[int, int, str]] | None:
    """(start, end, kind) of every tag, quotes inside tags respected; None when the source
    holds something a layout change could alter (a raw block, an unclosed tag)."""
    out, pos = [], 0
    while (m := _TAG.search(src, pos)) is not None:
        kind, i, quote = m.group(1), m.end(), None
        while i < len(src):
            ch = src[i]
            if quote:
                i += 2 if ch == "\\" else 1
                quote = None if ch == quote else quote
                continue
            if ch in "'\"" and kind != "#":
                quote = ch
            elif src.startswith(_CLOSE[kind], i):
                break
            i += 1
        else:
            return None
        end = i + 2
        if kind == "%" and re.match(r"\{%-?\s*raw\b", src[m.start():end]):
            return None
        out.append((m.start(), end, kind))
        pos = end
    return out


def _word(tag: str) -> str:
    m = re.match(r"\{%[-+]?\s*(\w+)", tag)
    return m.group(1) if m else ""


def readable_jinja(src: str) -> str:
    """A chat template written on one line, laid out one tag a line and indented by its blocks,
    for the editor. A line break goes only between two adjacent tags where one side trims
    whitespace ({%- or -%}): Jinja drops it there, so the template renders exactly as before.
    A template that already has line breaks is its author's layout and is returned as it is."""
    if not src or "\n" in src:
        return src
    tags = _tags(src)
    if not tags:
        return src
    out, depth, prev_end, prev_trims = [], 0, 0, False
    for start, end, kind in tags:
        tag = src[start:end]
        word = _word(tag) if kind == "%" else ""
        closes = word.startswith("end") or word in _MIDS
        if start == prev_end and out and (prev_trims or tag[2:3] == "-"):
            out.append("\n" + "    " * max(depth - closes, 0))
        else:
            out.append(src[prev_end:start])
        out.append(tag)
        if word in _OPENS or (word == "set" and "=" not in tag):
            depth += 1
        elif word.startswith("end"):
            depth = max(depth - 1, 0)
        prev_end, prev_trims = end, tag[-3:-2] == "-"
    out.append(src[prev_end:])
    return "".join(out)


def load_own_view(model: str, template: str, trust: bool = False) -> tuple[str, str]:
    """(the tokenizer's own template laid out for the editor, what happened). The template
    choice stays as it is: the editor is only used when the choice is `custom`."""
    src = readable_jinja(own_source(model, trust))
    n = src.count("\n") + 1
    if template == "custom":
        return src, (f"Loaded the tokenizer's own template into the editor ({n} lines). The template is "
                     "**custom**: Render and training use what the editor holds.")
    return src, (f"Loaded the tokenizer's own template into the editor ({n} lines). The template stays "
                 f"**{template or 'auto'}**: choose **custom** to render and train with your edits.")


def build(ui: dict) -> None:
    gr.Markdown("How conversations become training text. `auto` keeps the model's own chat template; trained "
                "tokens (assistant answers and their end-of-turn) are highlighted.")
    with gr.Row():
        ui["template"] = gr.Dropdown(template_choices(), value="auto", label="Template", elem_id="template-choice")
        ui["template_row"] = gr.Number(value=0, precision=0, label="Dataset row to render (0-based)")
        ui["template_use_data"] = gr.Checkbox(value=True, label="Render a dataset row (else a built-in sample)")
    ui["custom_jinja"] = gr.Code(label="Custom Jinja (used when the template is custom)", language="jinja2",
                                 lines=12, max_lines=40, wrap_lines=True, elem_id="template-editor")
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
    ui["tab_template"].select(view, inputs, [ui["template_out"], ui["template_md"]], api_visibility="private")

    def load_own(model, template, trust):
        try:
            return load_own_view(model, template, trust)
        except Exception as e:  # noqa: BLE001 - the editor keeps what it has
            return gr.skip(), err_md(e)

    ui["template_load_own"].click(load_own, [ui["model"], ui["template"], ui["trust_remote_code"]],
                                  [ui["custom_jinja"], ui["template_md"]], api_name="template_source")
