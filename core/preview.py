"""Dataset preview: samples rendered exactly as training sees them (the same encode_rows). One
function, `samples`, serves `lorastudio preview` and the Dataset tab (through core.analysis).

Needs only the tokenizer: works on a folder holding just tokenizer files."""

from __future__ import annotations

OPTIONS = ("train_on", "reasoning", "system")  # the template options (config.TemplateSection)


def samples(tokenizer, template, rows: list[dict], row_numbers: list[int], n: int, cutoff: int | None,
            unit: str = "row") -> tuple[list[dict], list[str]]:
    """The first N training samples of ROWS (a row split by answer gives several, each naming its
    source row) -> (samples, refusals: one "row R: reason" per row the template refused)."""
    from . import labels
    from .render import TemplateError

    out, refused = [], []
    for ex, row in zip(rows, row_numbers):
        if len(out) >= n:
            break
        try:
            found = labels.encode_rows(tokenizer, template, ex, max_length=cutoff)
        except TemplateError as e:
            refused.append(f"{unit} {row}: {e}")
            continue
        for enc in found[: n - len(out)]:
            out.append({
                "row": row, "messages": ex.get("messages"), **({"tools": ex["tools"]} if ex.get("tools") else {}),
                "text": enc.text, "trained_spans": [list(s) for s in labels.trained_spans_chars(enc)],
                "n_tokens": len(enc.input_ids), "n_trained": enc.n_trained, "truncated": enc.truncated,
                "notes": list(enc.notes), **({"text_only": ex["text"]} if "text" in ex else {}),
            })
    return out, refused


def preview_with_reports(config: str | None = None, model: str | None = None, data: str | None = None,
                         template: str | None = None, n: int = 3, fmt: str = "auto", custom_jinja: str | None = None,
                         cutoff_len: int | None = None, trust: bool | None = None, **options):
    """(samples, data load reports, template warnings, refusals). OPTIONS: the template options;
    those not given come from CONFIG, else their defaults."""
    from . import config as config_lib
    from . import data as data_lib
    from . import model as model_lib
    from . import preference_data, templates, tiny
    from .render import TemplateError

    chosen = {k: v for k, v in options.items() if v is not None}
    if config:
        from lorastudio import presets

        cfg = config_lib.load(presets.resolve(config))
        model = model or cfg.model.name_or_path
        template = template or cfg.template.name
        custom_jinja = custom_jinja or cfg.template.custom_jinja
        cutoff_len = cutoff_len or cfg.template.cutoff_len
        sources = [s.model_dump() for s in cfg.data.sources] if not data else [{"path": data, "format": fmt}]
        trust = cfg.model.trust_remote_code if trust is None else trust
        chosen = {k: getattr(cfg.template, k) for k in OPTIONS} | chosen
    else:
        sources = [{"path": data, "format": fmt}]
    for s in sources:
        s["path"] = tiny.resolve_data(s["path"])
    tokenizer = model_lib.load_tokenizer(model, trust_remote_code=bool(trust))
    tokenizer, tmpl, _added, _ids = templates.with_template(tokenizer, template, custom_jinja, **chosen)
    out, reports, refused = [], [], []
    for src in sources:
        unit = "line" if str(src["path"]).endswith((".jsonl", ".ndjson", ".txt")) else "row"
        kind = preference_data.kind_of(src["path"], src.get("format", "auto"), src.get("columns"))
        if kind:  # pairs or labelled answers: both sides as a preference stage labels them (train_on last)
            rows, report = preference_data.load_file(src["path"], src.get("format", "auto"), src.get("columns"),
                                                     src.get("placeholders"), want=kind)
            tok, last, _a, _i = templates.with_template(tokenizer, template, custom_jinja, copy=True,
                                                        **{**chosen, "train_on": "last"})
            found, no = preference_data.samples(tok, last, rows, report.used_rows, n - len(out), cutoff_len,
                                                unit)
        else:
            rows, report = data_lib.load_file(src["path"], src.get("format", "auto"), src.get("columns"),
                                              src.get("placeholders"))
            found, no = samples(tokenizer, tmpl, rows, report.used_rows, n - len(out), cutoff_len, unit)
        reports.append(report)
        out += found
        refused += [f"{report.path}: {r}" for r in no]
    if not out and refused:
        raise TemplateError(f"the template refused every row ({refused[0]})")
    return out, reports, templates.template_warnings(tokenizer, tmpl), refused


def highlight(text: str, spans: list, color: bool = True) -> str:
    """Trained text in green (tty) or between [[ ]] markers (pipes, logs)."""
    on, off = ("\x1b[42;30m", "\x1b[0m") if color else ("[[", "]]")
    parts, pos = [], 0
    for start, end in spans:
        parts += [text[pos:start], on, text[start:end], off]
        pos = end
    parts.append(text[pos:])
    return "".join(parts)
