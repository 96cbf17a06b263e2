"""Chat with a GGUF export through llama.cpp (llama-cpp-python), on CPU.

    load(path)   -> (GGUFModel, tokenizer, template): the run's tokenizer and template, saved beside
                    the GGUF in OUT/tokenizer/ by the export, render and tokenize the prompt exactly
                    as training did; llama.cpp runs the model on those token ids
    GGUFModel.stream / reply   what core.generate.stream / reply do for a transformers model (it
                    hands a GGUFModel to these): stop at the template's end of turn, the EOS, every
                    token llama.cpp marks end-of-generation and the template's stop strings
    GGUFModel.greedy_ids / logits   the verification's view: greedy ids, teacher-forced logits
"""

from __future__ import annotations

import os
from pathlib import Path

from . import gguf_tools

TOKENIZER_DIR = "tokenizer"  # OUT/tokenizer: the run's tokenizer files and lorastudio.json


class GGUFModel:
    is_gguf = True  # core.generate hands a GGUFModel its own generation
    device = "cpu"

    def __init__(self, path: str | Path, n_ctx: int = 4096, logits_all: bool = False):
        gguf_tools.require()
        from llama_cpp import Llama, llama_cpp

        self.path = Path(path)
        n_ctx = min(n_ctx, _context_length(self.path) or n_ctx)  # past the trained length llama.cpp warns
        threads = max(1, int(os.environ.get("OMP_NUM_THREADS") or 0) or min(os.cpu_count() or 1, 8))
        self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         logits_all=logits_all, verbose=False, seed=0)
        vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.eog = {t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        self.training = False  # what generate's callers may read

    # ---------------------------------------------------------------- the verification's view

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of a rendered prompt (special tokens parsed, no BOS added:
        a rendered template carries its own)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def logits(self, ids: list[int]):
        """Float32 logits for every position (needs logits_all=True)."""
        self.llm.reset()
        self.llm.eval(list(ids))
        return self.llm.scores[: self.llm.n_tokens, :].copy()

    def greedy_ids(self, prompt_ids: list[int], max_new_tokens: int, stop_ids) -> list[int]:
        """Greedy decoding (llama.cpp's greedy sampler, repeat penalty 1): the ids after the
        prompt, the stop token included."""
        stop = set(stop_ids) | self.eog
        out: list[int] = []
        for tok in self.llm.generate(list(prompt_ids), temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if tok in stop or len(out) >= max_new_tokens:
                break
        return out

    # ---------------------------------------------------------------- chat

    def stream(self, tokenizer, template, messages: list[dict], system: str | None = None, temperature: float = 0.7,
               top_p: float = 0.9, top_k: int = 50, max_new_tokens: int = 256, repetition_penalty: float = 1.0,
               greedy: bool = False, use_adapter: bool = True):
        from .generate import build_prompt, eos_ids, until_stops

        prompt = build_prompt(tokenizer, template, messages, system)
        ids = tokenizer(prompt, add_special_tokens=template is None)["input_ids"]
        stop_ids = set(eos_ids(tokenizer, template)) | self.eog
        stops = list(getattr(template, "stop_strings", None) or [])
        if len(ids) + max_new_tokens > self.llm.n_ctx():
            raise ValueError(f"the prompt is {len(ids)} tokens; with {max_new_tokens} new ones that is more than "
                             f"the {self.llm.n_ctx()} this GGUF chat holds (Clear starts anew)")
        greedy = greedy or temperature <= 0
        tokens = self.llm.generate(ids, temp=0.0 if greedy else temperature, top_p=top_p, top_k=top_k, min_p=0.0,
                                   repeat_penalty=repetition_penalty, reset=True)

        def texts():  # the reply so far, one token longer each time
            out: list[int] = []
            for n, tok in enumerate(tokens):
                if tok in stop_ids or n >= max_new_tokens:
                    return
                out.append(tok)
                yield tokenizer.decode(out, skip_special_tokens=True)

        yield from until_stops(texts(), stops)

    def reply(self, tokenizer, template, messages, **gen) -> str:
        return "".join(self.stream(tokenizer, template, messages, **gen)).strip()

    def close(self) -> None:
        """Free llama.cpp's model now (at interpreter exit its finalizer can run after ctypes is gone)."""
        self.llm.close()


def _context_length(path: Path) -> int | None:
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = r.fields.get("general.architecture")
    field = r.fields.get(f"{arch.contents()}.context_length") if arch is not None else None
    return int(field.contents()) if field is not None else None


def is_gguf(target) -> bool:
    return str(target).lower().endswith(".gguf")


def load(path: str | Path, logits_all: bool = False):
    """(GGUFModel, tokenizer, template) for OUT/model-TYPE.gguf of a LoRA Studio export."""
    from . import convert

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: GGUF file not found")
    folder = path.parent / TOKENIZER_DIR
    if not (folder / "lorastudio.json").exists():
        raise ValueError(f"{path} is not a LoRA Studio GGUF export: {folder} (the run's tokenizer and template, "
                         "which render the prompt as training did) is missing; export it with "
                         "`lorastudio convert RUN_DIR --gguf TYPE`")
    tokenizer, template, _meta = convert.folder_tokenizer(folder)
    return GGUFModel(path, logits_all=logits_all), tokenizer, template
