"""Dataset preview: samples rendered exactly as training sees them (same encode_example).

Needs only the tokenizer: works on a folder holding just tokenizer files."""

from __future__ import annotations


def preview_with_reports(config: str | None = None, model: str | None = None, data: str | None = None,
                         template: str | None = None, n: int = 3, fmt: str = "auto", custom_jinja: str | None = None,
                         cutoff_len: int | None = None):
    """(samples, data load reports, template warnings)."""
    from . import config as config_lib
    from . import data as data_lib
    from . import model as model_lib
    from . import labels, templates, tiny

    if config:
        from lorastudio import presets

        cfg = config_lib.load(presets.resolve(config))
        model = model or cfg.model.name_or_path
        template = template or cfg.template.name
        custom_jinja = custom_jinja or cfg.template.custom_jinja
        cutoff_len = cutoff_len or cfg.template.cutoff_len
        sources = [s.model_dump() for s in cfg.data.sources] if not data else [{"path": data, "format": fmt}]
        trust = cfg.model.trust_remote_code
    else:
        sources = [{"path": data, "format": fmt}]
        trust = False
    for s in sources:
        s["path"] = tiny.resolve_data(s["path"])
    tokenizer = model_lib.load_tokenizer(model, trust_remote_code=trust)
    tokenizer, tmpl, _added, _ids = templates.with_template(tokenizer, template, custom_jinja)  # as training has them
    out, reports = [], []
    for src in sources:
        rows, report = data_lib.load_file(src["path"], src.get("format", "auto"), src.get("columns"),
                                          src.get("placeholders"))
        reports.append(report)
        for ex in rows:
            if len(out) >= n:
                break
            enc = labels.encode_example(tokenizer, tmpl, ex, max_length=cutoff_len)
            out.append({
                "messages": ex.get("messages"), "text": enc.text,
                "trained_spans": [list(s) for s in labels.trained_spans_chars(enc)],
                "n_tokens": len(enc.input_ids), "n_trained": enc.n_trained, "truncated": enc.truncated,
                **({"text_only": ex["text"]} if "text" in ex else {}),
            })
    return out, reports, templates.template_warnings(tokenizer, tmpl)


def highlight(text: str, spans: list, color: bool = True) -> str:
    """Trained text in green (tty) or between [[ ]] markers (pipes, logs)."""
    on, off = ("\x1b[42;30m", "\x1b[0m") if color else ("[[", "]]")
    parts, pos = [], 0
    for start, end in spans:
        parts += [text[pos:start], on, text[start:end], off]
        pos = end
    parts.append(text[pos:])
    return "".join(parts)
