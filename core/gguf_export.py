"""GGUF export of a run (core.gguf_export): `python -m lorastudio.core.convert_job RUN_DIR --gguf TYPE [--checkpoint N] [--out DIR]`.

    OUT (default RUN_DIR/gguf-TYPE[-ckptN]/)
        model-TYPE.gguf     llama.cpp's converter (f32/f16/bf16 written by it; other types
                            quantized by llama.cpp from its f16)
        Modelfile           for `ollama create` (core.modelfile)
        tokenizer/          the run's tokenizer and template (what `lorastudio chat OUT/model-TYPE.gguf`
                            renders prompts with, exactly as training did)
        verification.json   {"passed": ..., figures} (core.gguf_verify)
        lorastudio.json     the run's template name, end of turn, stops; the merged model it came from

The GGUF is made from the run's verified 16/32-bit merge (RUN_DIR/merged[-ckptN], made first by
core.convert.merge when missing, reused when it is there and passed; a QLoRA run is merged into
its unquantized base like any merge). The architecture is checked against the converter's own
registry before anything is merged. Like every convert output, OUT is written to OUT.partial and
renamed when complete, and never overwritten.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import convert, gguf_tools, modelfile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt", "lorastudio.json")


def default_out(run_dir: Path, qtype: str, checkpoint: int | None) -> Path:
    return convert.default_out(run_dir, f"gguf-{qtype}", checkpoint)


def gguf_name(qtype: str) -> str:
    return f"model-{qtype}.gguf"


def _architectures(cfg) -> list[str]:
    from transformers import AutoConfig

    from . import model as model_lib

    path = model_lib.resolve_path(cfg.model.name_or_path)
    conf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    return list(getattr(conf, "architectures", None) or [])


def _merged(run_dir: Path, checkpoint: int | None, device: str) -> Path:
    """The run's verified merge: reused when it is there and passed, made otherwise."""
    merged = convert.default_out(run_dir, "merged", checkpoint)
    report = merged / "verification.json"
    if merged.exists():
        passed = json.loads(report.read_text()).get("passed") if report.exists() else None
        if passed is not True:
            raise convert.ConvertError(f"{merged} exists but its merge verification {'failed' if passed is False else 'is missing'}"
                                       "; delete it to merge again")
        convert.log(f"reusing the verified merge {merged}")
        return merged
    convert.log(f"no merge yet: merging into {merged} first")
    report = convert.merge(run_dir, checkpoint, "auto", merged, device)
    if not report["verification"]["passed"]:
        raise convert.ConvertError(f"the merge into {merged} failed its verification; not converting it")
    return merged


def _converter_input(merged: Path, cfg, tmp: Path) -> Path:
    """The folder llama.cpp's converter reads: the merge, plus the base's SentencePiece
    tokenizer.model where the merge (saved from the fast tokenizer) lacks it. Without that file the
    converter builds a Llama vocabulary from tokenizer.json with every score at -1000, and
    llama.cpp's SentencePiece tokenizer then merges left to right instead of by the model's merge
    order: the tiny model's "assistant" became ass|ist|ant, so llama.cpp and Ollama rendering the
    template themselves fed the model other ids than training did. The merge itself is left as
    verified: the converter reads a folder of links to it and the base's file."""
    from . import model as model_lib

    base_spm = Path(model_lib.resolve_path(cfg.model.name_or_path)) / "tokenizer.model"
    if (merged / "tokenizer.model").exists() or not base_spm.is_file():
        return merged
    staged = tmp / "converter-input"
    staged.mkdir()
    for f in merged.iterdir():
        (staged / f.name).symlink_to(f.resolve())
    (staged / "tokenizer.model").symlink_to(base_spm.resolve())
    convert.log("the base's tokenizer.model beside the merge for the converter (SentencePiece merge scores)")
    return staged


def export(run_dir: str | Path, qtype: str = "q8_0", checkpoint: int | None = None, out: str | Path | None = None,
           device: str = "auto") -> dict:
    qtype = (qtype or "").lower()
    if qtype not in gguf_tools.TYPES:
        raise convert.ConvertError(f"--gguf: {qtype!r} is not one of {', '.join(gguf_tools.TYPES)}")
    run_dir = Path(run_dir).resolve()
    convert.adapter_dir(run_dir, checkpoint)  # a run with that adapter, or a clear refusal
    cfg = convert.run_config(run_dir)
    gguf_tools.require()
    gguf_tools.require_gguf()
    out = Path(out).resolve() if out else default_out(run_dir, qtype, checkpoint)
    if out.exists():
        raise convert.ConvertError(f"{out} already exists; not overwriting (choose another --out or delete it)")
    gguf_tools.converter(convert.log)
    arch = gguf_tools.check_architecture(_architectures(cfg))  # before a merge that could not be converted
    convert.log(f"architecture {arch}: llama.cpp's converter {gguf_tools.LLAMA_CPP_VERSION} knows it")
    merged = _merged(run_dir, checkpoint, device)
    tmp = convert._claim(out)
    name = gguf_name(qtype)
    try:
        target = tmp / name
        source = _converter_input(merged, cfg, tmp)
        if qtype in gguf_tools.CONVERTER_TYPES:
            convert.log(f"converting {merged.name} to GGUF {qtype} (llama.cpp's convert_hf_to_gguf.py)")
            gguf_tools.run_converter(source, target, qtype, convert.log)
        else:
            f16 = tmp / "intermediate-f16.gguf"
            convert.log(f"converting {merged.name} to GGUF f16 (llama.cpp's convert_hf_to_gguf.py)")
            gguf_tools.run_converter(source, f16, "f16", convert.log)
            convert.log(f"quantizing to {qtype} (llama.cpp's llama_model_quantize)")
            gguf_tools.quantize(f16, target, qtype)
            f16.unlink()
        if source != merged:
            shutil.rmtree(source)  # (links only)
        (tmp / gguf_chat_dir()).mkdir()
        for f in TOKENIZER_FILES:
            if (merged / f).exists():
                shutil.copyfile(merged / f, tmp / gguf_chat_dir() / f)
        tokenizer, template, meta = convert.folder_tokenizer(merged)
        mf = modelfile.write(tmp / "Modelfile", name, tokenizer, template)
        convert.log(f"Modelfile: TEMPLATE {'in Go form' if mf['template'] == 'go' else 'from the GGUF'}, "
                    f"stops {mf['stops']}")
        from . import gguf_verify

        v = gguf_verify.verify(merged, target, qtype, gguf_verify.prompts_of(cfg), log=convert.log)
        # the Go template is checked on the same grounds: it renders what the run's template renders
        report = {"run_dir": str(run_dir), "checkpoint": checkpoint, "out": str(out), "gguf": str(out / name),
                  "type": qtype, "merged": str(merged), "architecture": arch,
                  "llama_cpp_python": gguf_tools.LLAMA_CPP_VERSION, "size_bytes": target.stat().st_size,
                  "modelfile": mf, "verification": v}
        (tmp / "verification.json").write_text(json.dumps({"passed": v["passed"], **report}, indent=2, default=str))
        (tmp / "lorastudio.json").write_text(json.dumps({**meta, "gguf": name, "type": qtype, "merged_model": str(merged),
                                                         "checkpoint": checkpoint}, indent=2, default=str))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    convert.log(f"verification {'PASSED' if v['passed'] else 'FAILED'} ({v['criterion']}, {qtype})")
    return report


def gguf_chat_dir() -> str:
    from .gguf_chat import TOKENIZER_DIR

    return TOKENIZER_DIR
