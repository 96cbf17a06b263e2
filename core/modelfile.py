"""An Ollama Modelfile beside a GGUF export.

    FROM ./model-TYPE.gguf
    TEMPLATE \"\"\"...\"\"\"        the run's chat template in Go-template form (.Messages, .Role, .Content),
                              derived by rendering the run's Jinja template on marker messages and
                              checked by rendering both on a test conversation; a template that does
                              not decompose into per-message pieces (a system prompt folded into the
                              first user turn, say) gets no TEMPLATE line, and Ollama uses the GGUF's own
    SYSTEM \"\"\"...\"\"\"          the system prompt given, else the template's default one (Qwen2.5's, say)
    PARAMETER stop "..."      every end-of-turn / EOS string of the run
"""

from __future__ import annotations

MARK = {"system": "\x01SYS\x01", "user": "\x01USR\x01", "assistant": "\x01AST\x01"}
CHECK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name?"}]


def stop_strings(tokenizer, template) -> list[str]:
    """The strings that end a turn: the template's end-of-turn token, the tokenizer's EOS, the
    template's stop strings (in that order, no repeats)."""
    out: list[str] = []
    for s in [getattr(template, "eot_token", None) or (template.eot(tokenizer) if template else None),
              tokenizer.eos_token, *(getattr(template, "stop_strings", None) or [])]:
        if s and s not in out:
            out.append(s)
    return out


def _render(template, tokenizer, messages, gen: bool) -> str:
    return template.render(messages, add_generation_prompt=gen, tokenizer=tokenizer)


def pieces(template, tokenizer) -> dict | None:
    """{"system": (pre, post), "user": (pre, post), "assistant": (pre, post)} such that a
    conversation renders as pre + content + post of each message, then the assistant's pre as the
    generation prompt; None when the template is not of that shape (checked on CHECK)."""
    if template is None:
        return None
    user, asst, system = ({"role": r, "content": MARK[r]} for r in ("user", "assistant", "system"))
    try:
        u0 = _render(template, tokenizer, [user], False)
        u1 = _render(template, tokenizer, [user], True)
        ua = _render(template, tokenizer, [user, asst], False)
        su = _render(template, tokenizer, [system, user], False)
    except Exception:  # noqa: BLE001 - a template that refuses these shapes has no Go form here
        return None
    # a BOS written once at the start of the conversation (Llama 3, Mistral) is a prefix of its own
    bos = getattr(tokenizer, "bos_token", None) or ""
    for prefix in ("", bos) if bos else ("",):
        if all(t.startswith(prefix) for t in (u0, u1, ua, su)):
            out = _pieces(*(t[len(prefix):] for t in (u0, u1, ua, su)))
            if out is not None:
                out["prefix"] = prefix
                if _check(out, template, tokenizer):
                    return out
    return None


def _pieces(u0: str, u1: str, ua: str, su: str) -> dict | None:
    if u0.count(MARK["user"]) != 1 or not u1.startswith(u0) or not ua.startswith(u0):
        return None
    gen_prompt = u1[len(u0):]
    a_pre, sep, a_post = ua[len(u0):].partition(MARK["assistant"])
    s_pre, sep2, after_system = su.partition(MARK["system"])
    if not sep or not sep2 or a_pre != gen_prompt:
        return None
    default = None
    if su.endswith(u0):  # no system message: nothing of a system block written
        s_post = after_system[: len(after_system) - len(u0)]
        u_pre, u_post = u0.split(MARK["user"])
    elif u0.startswith(s_pre) and u0.endswith(after_system) and len(u0) >= len(s_pre) + len(after_system):
        # the template writes a default system prompt when there is none (Qwen2.5, SmolLM): Ollama's
        # SYSTEM says it, and Ollama puts it first in every conversation that has no system message
        default = u0[len(s_pre): len(u0) - len(after_system)]
        s_post = a_post if after_system.startswith(a_post) else ""
        u_pre, u_post = after_system[len(s_post):].split(MARK["user"])
    else:
        return None
    return {"system": (s_pre, s_post), "user": (u_pre, u_post), "assistant": (a_pre, a_post),
            "default_system": default}


def go_render(p: dict, messages: list[dict], gen: bool) -> str:
    """What the Go template written by go_template() renders (the same pieces, in Python)."""
    text = p.get("prefix", "")
    if p.get("default_system") is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": p["default_system"]}] + list(messages)
    for m in messages:
        pre, post = p[m["role"]]
        text += pre + m["content"] + post
    return text + (p["assistant"][0] if gen else "")


def _check(p: dict, template, tokenizer) -> bool:
    try:
        return all(go_render(p, msgs, gen) == _render(template, tokenizer, msgs, gen)
                   for msgs, gen in ((CHECK, True), (CHECK[1:], True), (CHECK[:3], False)))
    except Exception:  # noqa: BLE001
        return False


def _go_literal(s: str) -> str:
    # Go template text is literal except for "{{"; a piece holding it is written as a Go string
    return s if "{{" not in s else "{{ " + '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '" }}'


def go_template(p: dict) -> str:
    """The pieces as an Ollama TEMPLATE: no trim markers (the pieces' whitespace is the template's),
    the generation prompt after the last message unless it is the assistant's."""
    parts = [_go_literal(p.get("prefix", "")), "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    for i, role in enumerate(("system", "user", "assistant")):
        pre, post = p[role]
        parts.append(("{{ if" if i == 0 else "{{ else if") + f' eq $m.Role "{role}" }}}}'
                     + _go_literal(pre) + "{{ $m.Content }}" + _go_literal(post))
    parts.append("{{ end }}")
    parts.append('{{ if and $last (ne $m.Role "assistant") }}' + _go_literal(p["assistant"][0]) + "{{ end }}")
    parts.append("{{ end }}")
    return "".join(parts)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write(path, gguf_name: str, tokenizer, template, system: str | None = None) -> dict:
    """Write the Modelfile; returns what it says (template form, stops, system)."""
    p = pieces(template, tokenizer)
    stops = stop_strings(tokenizer, template)
    lines = [f"# Ollama Modelfile written by LoRA Studio: ollama create NAME -f {path.name}",
             f"FROM ./{gguf_name}"]
    if p is not None:
        lines.append(f'TEMPLATE """{go_template(p)}"""')
    else:
        lines.append("# no TEMPLATE: the run's chat template has no per-message Go form; Ollama reads the GGUF's own")
    system = system or (p or {}).get("default_system")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"template": "go" if p is not None else "gguf", "stops": stops, "system": system}
