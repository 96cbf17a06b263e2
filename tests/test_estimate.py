"""core.estimate: sanity and monotonicity of the VRAM model, suggestions, CLI output, and that
it stays torch-free (the web app calls it)."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from lorastudio.core import config as C
from lorastudio.core import arch as A
from lorastudio.core import estimate as E
from lorastudio.core import memory as M
from lorastudio.core import resolve as R
from lorastudio.webui import estimate_view

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def cfg(**kw):
    data = {"model": {"name_or_path": LLAMA}, "method": "lora", "template": {"cutoff_len": 2048},
            "training": {"micro_batch_size": 1}}
    for k, v in kw.items():
        C.apply_override(data, f"{k}={v}")
    return C.from_dict(data)


def gpu(c):
    """Stage 2 of the resolver on an assumed CUDA card (what the training child has before the plan)."""
    return R.resolve(c, R.assumed("cuda"))


def total(c, **kw):
    return E.estimate(c, detect=False, **kw)["total_gib"]


def test_known_parameter_counts():
    from lorastudio.core import model_configs as MC

    assert A.param_counts(MC.lookup(LLAMA))["total"] == 8_030_261_248  # the published figures
    assert A.param_counts(MC.lookup("Qwen/Qwen2.5-0.5B-Instruct"))["total"] == 494_032_768
    assert A.param_counts(MC.lookup("google/gemma-2-2b-it"))["total"] == 2_614_341_888


def test_components_and_method_ordering():
    q, l, f = total(cfg(method="qlora")), total(cfg()), total(cfg(method="full"))
    assert q < l < f
    est = E.estimate(cfg(method="qlora"), detect=False)
    comp = est["components"]
    assert {"weights", "lora", "activations", "logits", "cuda_context", "allocator_margin"} <= set(comp)
    assert comp["cuda_context"] == pytest.approx(M.CUDA_CONTEXT_GIB)
    # 4-bit linears + bf16 embeddings/lm_head/norms; stock PEFT's fp32 upcast adds 2 bytes/param of those
    assert 5.0 < comp["weights"] < 5.6
    upcast = E.estimate(cfg(method="qlora", **{"quantization.fp32_upcast": "true"}), detect=False)["components"]
    assert 6.5 < upcast["weights"] < 8.0 and upcast["logits"] > comp["logits"]
    assert 14.0 < E.estimate(cfg(), detect=False)["components"]["weights"] < 15.5  # bf16
    full = E.estimate(cfg(method="full"), detect=False)["components"]
    assert full["optimizer"] == pytest.approx(2 * full["weights"])  # AdamW state in the params' dtype


def test_double_quant_and_bits():
    dq = E.estimate(cfg(method="qlora"), detect=False)["components"]["weights"]
    no = E.estimate(cfg(method="qlora", **{"quantization.double_quant": "false"}), detect=False)["components"]["weights"]
    eight = E.estimate(cfg(method="qlora", **{"quantization.bits": 8}), detect=False)["components"]["weights"]
    assert dq < no < eight


def test_checkpointing_cutoff_and_batch_monotonic():
    on = E.estimate(cfg(**{"training.gradient_checkpointing": "true"}), detect=False)["components"]["activations"]
    off = E.estimate(cfg(**{"training.gradient_checkpointing": "false"}), detect=False)["components"]["activations"]
    assert on < off / 3
    assert total(cfg(**{"template.cutoff_len": 1024})) < total(cfg()) < total(cfg(**{"template.cutoff_len": 4096}))
    assert total(cfg(**{"training.micro_batch_size": 1})) < total(cfg(**{"training.micro_batch_size": 4}))
    assert total(cfg(**{"lora.r": 8})) < total(cfg(**{"lora.r": 128}))


def test_eager_attention_costs_more():
    g = {"model.name_or_path": "google/gemma-2-2b-it"}
    assert total(cfg(**g, **{"model.attn_implementation": "eager"})) > total(cfg(**g))


def test_fits_and_suggestions_on_a_small_card():
    big = cfg(**{"training.micro_batch_size": 4})
    est = E.estimate(big, gpu_mem_gib=12, detect=False)
    assert est["fits"] is False and est["suggestions"]
    texts = " ".join(s["text"] for s in est["suggestions"])
    assert "micro-batch 1" in texts and "cutoff_len" in texts and "QLoRA" in texts
    assert any(s["fits"] for s in est["suggestions"])
    best = est["suggestions"][0]
    assert best["fits"] and all(x.count("=") == 1 for x in best["set"])
    assert E.estimate(big, gpu_mem_gib=80, detect=False)["fits"] is True
    nogc = E.estimate(cfg(**{"training.gradient_checkpointing": "false", "training.micro_batch_size": 4}),
                      gpu_mem_gib=16, detect=False)
    assert any("checkpointing" in s["text"] for s in nogc["suggestions"])


def test_time_table_measured_or_unmeasured():
    q = E.estimate(cfg(**{"model.name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}), detect=False, dataset_tokens=1_000_000)
    tps = E.THROUGHPUT[("0.5B", "lora", "H200")]["tokens_per_s"]
    assert q["time"]["status"] == "measured" and q["time"]["epoch_s"] == pytest.approx(1e6 / tps)
    assert E.estimate(cfg(), detect=False)["time"]["status"] == "unmeasured"


def test_parse_gpu_mem():
    assert E.parse_gpu_mem("24GB") == 24 and E.parse_gpu_mem("80 GiB") == 80 and E.parse_gpu_mem("16g") == 16
    assert E.parse_gpu_mem(None) is None
    with pytest.raises(ValueError):
        E.parse_gpu_mem("lots")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(E.EstimateError, match="no stored architecture"):
        E.estimate(cfg(**{"model.name_or_path": "someone/unknown-model"}), detect=False)
    assert "unavailable" in estimate_view.estimate_markdown(cfg(**{"model.name_or_path": "someone/unknown-model"}))


def test_the_embedded_model_gets_its_note_under_any_build_name():
    """A run's config.yaml pins the build (builtin:tiny@4): the Train and Model tabs still say
    what the tiny model needs instead of estimating it as a hub model."""
    for name in ("builtin:tiny", "builtin:tiny@4", "builtin:tiny@3"):
        assert estimate_view.estimate_markdown(cfg(**{"model.name_or_path": name})) == estimate_view.TINY_NOTE, name
        assert estimate_view.model_markdown(name) == estimate_view.TINY_NOTE, name


def test_local_folder_config_json(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "tie_word_embeddings": False}))
    est = E.estimate(cfg(**{"model.name_or_path": str(tmp_path)}), detect=False)
    assert est["params_total"] == 1_100_048_384  # TinyLlama-1.1B


def test_cli_estimate_and_list_presets(capsys):
    from lorastudio.cli import commands as cli

    assert cli.main(["estimate", "llama3_1_8b_qlora", "--gpu-mem", "8GB"]) == 1  # not even with the plan
    out = capsys.readouterr().out
    assert "does NOT fit the 8 GiB card, even with the memory plan" in out and "--set" in out
    assert "weights" in out and "CUDA context" in out
    assert cli.main(["estimate", "llama3_1_8b_qlora", "--gpu-mem", "80GB", "--set", "template.cutoff_len=1024"]) == 0
    assert "fits the 80 GiB" in capsys.readouterr().out
    assert cli.main(["list-presets"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("llama3_1_8b_qlora"))
    est = E.estimate(C.load(ROOT / "presets" / "llama3_1_8b_qlora.yaml"), detect=False)
    assert "qlora" in line and f"{est['total_rounded']} GiB" in line and LLAMA in line
    assert cli.main(["estimate", "llama3_1_8b_qlora", "--gpu-mem", "lots"]) == 2


def test_train_gpu_mem_flag_parses():
    from lorastudio.cli import commands as cli

    a = cli.build_parser().parse_args(["train", "x.yaml", "--gpu-mem", "24GB"])
    assert a.gpu_mem == "24GB"
    assert cli.build_parser().parse_args(["train", "x.yaml", "--gpu-mem"]).gpu_mem == ""
    assert cli.build_parser().parse_args(["train", "x.yaml"]).gpu_mem is None


def test_ui_helpers_are_torch_free():
    code = ("import sys, lorastudio.webui.tab_train as T, lorastudio.webui.tab_model as M\n"
            "md = T.estimate_view('llama3_1_8b_qlora', T.preset_form('llama3_1_8b_qlora'), '8GB')\n"
            "assert 'does NOT fit' in md and 'To fit' in md, md\n"
            "assert 'qlora' in M.model_estimate_view('Qwen/Qwen2.5-7B-Instruct')\n"
            "assert 'tiny' in M.model_estimate_view('builtin:tiny')\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_checkpointing_auto_decision_follows_the_card_and_the_data():
    """gradient_checkpointing: auto on CUDA: off when the dataset's largest micro-batch fits the
    card's free memory without it (the Llama-3.1-8B QLoRA preset: on for an 8 GiB card, off on 80 GiB)."""
    c = cfg(method="qlora", **{"training.micro_batch_size": 1})
    arch = E.arch_for(LLAMA)
    on, layers, mlps, why = M.checkpointing_decision(gpu(c), arch, max_tokens=2048, free_gib=7.5)
    assert on is True and layers == "all" and mlps == "all" and why.startswith("on, every layer:") and "33%" in why
    off, layers, mlps, why = M.checkpointing_decision(gpu(c), arch, max_tokens=2048, free_gib=79.0)
    assert off is False and layers == "all" and mlps == 0 and why.startswith("off:") and "2048 tokens" in why
    # a long batch on the same 80 GiB card keeps it on
    assert M.checkpointing_decision(gpu(c), arch, max_tokens=200_000, free_gib=79.0)[0] is True
    assert M.checkpointing_decision(gpu(c), None, max_tokens=10, free_gib=79.0) == (True, "all", 0,
                                                                                    "on: unknown architecture")


def test_checkpoint_layers_the_fewest_that_fit():
    """Between "fits without" and "needs every layer" the plan checkpoints the fewest layers that
    fit: the estimate falls with each checkpointed layer, the chosen count fits with headroom and
    one fewer does not; an explicit count or `all` is kept; an explicit `true` means every layer.
    (MLP recompute off here: tests/test_estimate.py::test_mlp_recompute_comes_before_checkpointed_layers.)"""
    c = gpu(cfg(method="qlora", **{"training.micro_batch_size": 1, "training.mlp_recompute": 0}))
    arch = E.arch_for(LLAMA)
    tokens, budget = 4096, 30.0
    need = [M._need(c, arch, tokens)(k) for k in range(33)]  # 0: checkpointing off
    # from the second layer on, each one checkpointed saves memory (the first only pays for the
    # buffer of the layer being recomputed)
    assert need[1] > need[0] and all(a > b for a, b in zip(need[1:], need[2:]))
    on, k, _mlps, why = M.checkpointing_decision(c, arch, tokens, budget)
    assert on is True and isinstance(k, int) and 0 < k < 32, why
    assert need[k] <= M.CHECKPOINTING_HEADROOM * budget < need[k - 1]
    assert f"on for {k} of 32 layers" in why and f"~{need[k]:.1f} GiB" in why
    out, why = R.plan(c, arch, tokens, budget)
    # QLoRA: the embedding table goes to CPU RAM before any layer recomputes (the cheaper saving),
    # then the fewest layers that fit with it there
    assert out["model.embeddings_on_cpu"] is True and why[0].startswith("embeddings in CPU RAM")
    on_cpu = c.model_copy(deep=True)
    on_cpu.model.embeddings_on_cpu = True
    k_cpu, k_gpu = M.checkpointing_decision(on_cpu, arch, tokens, budget)[1], k
    assert isinstance(k_cpu, int) and k_cpu < k
    assert out["training.checkpoint_layers"] == k_cpu and out["training.gradient_checkpointing"] is True
    assert out["training.optimizer"] == "adamw_torch_fused"  # layers first: the 8-bit optimizer is slower
    need = [M._need(on_cpu, arch, tokens)(j) for j in range(33)]
    k = k_cpu
    # when a typical micro-batch fits without recompute the table stays on the GPU (its per-step
    # cost would buy nothing on most steps); the longest batch still gets its layers
    short, short_why = R.plan(c, arch, tokens, budget, typical_tokens=512)
    assert short["model.embeddings_on_cpu"] is False and short["training.checkpoint_layers"] == k_gpu, short_why
    assert out["training.checkpoint_per_batch"] is True and any("layers by batch" in w for w in why)
    assert why[-1] == f"estimated peak ~{need[k]:.1f} GiB of {budget:.1f} GiB"
    kept = gpu(cfg(method="qlora", **{"training.micro_batch_size": 1, "training.checkpoint_layers": 3,
                                      "training.mlp_recompute": 0}))
    assert M.checkpointing_decision(kept, arch, tokens, budget)[:2] == (True, 3)
    assert M.checkpointing_decision(kept, arch, 512, 79.0)[:2] == (False, 3)  # fits without: off
    every = gpu(cfg(method="qlora", **{"training.gradient_checkpointing": "true"}))
    assert every.training.checkpoint_layers == "all"
    assert "training.checkpoint_layers" not in R.plan(every, arch, tokens, budget)[0]
    with pytest.raises(C.ConfigError, match="training.offload_activations: needs checkpoint_layers all"):
        gpu(cfg(**{"training.offload_activations": "true", "training.checkpoint_layers": 4}))
    with pytest.raises(C.ConfigError, match="training.checkpoint_layers"):
        cfg(**{"training.checkpoint_layers": "0"})  # no layers: that is gradient_checkpointing false


def test_memory_plan_picks_speed_when_it_fits_and_savings_when_not():
    c = cfg(method="qlora", **{"training.micro_batch_size": 1})
    arch = E.arch_for(LLAMA)
    big, why = R.plan(gpu(c), arch, max_tokens=2048, budget_gib=79.0)
    assert big == {"training.gradient_checkpointing": False, "training.checkpoint_layers": "all",
                   "training.checkpoint_per_batch": False,
                   "training.optimizer": "adamw_torch_fused",
                   "model.embeddings_on_cpu": False, "training.offload_activations": False,
                   "training.tiled_mlp": False, "training.cudnn_attention": False,
                   "training.mlp_recompute": 0}, why
    small, why = R.plan(gpu(c), arch, max_tokens=2048, budget_gib=7.5, host_gib=16)  # "an 8 GB card"
    assert small == {"training.gradient_checkpointing": True, "training.checkpoint_layers": "all",
                     "training.checkpoint_per_batch": False,  # offloaded: every layer, every batch
                     "training.optimizer": "adamw_bnb_8bit",
                     "model.embeddings_on_cpu": True, "training.offload_activations": True,
                     "training.tiled_mlp": False, "training.cudnn_attention": False,
                     "training.mlp_recompute": 0}, why
    assert any("embeddings in CPU RAM" in w for w in why) and "of 7.5 GiB" in why[-1]
    assert not any("layers by batch" in w for w in why), why
    # inputs of 2048 tokens (32 layers + final norm + loss): 16 MiB each, pinned
    assert any("activations in CPU RAM (~0.5 GiB)" in w for w in why), why
    # 348k tokens (10x stock's longest on 80 GiB): 2.66 GiB per input, in plain RAM at that size
    # (pinned, torch would round each to 4 GiB: the OOM killer, measured): 90.3 GiB; a host with
    # 100 GiB available keeps them on the GPU and says why, one with 124 GiB takes them
    long, why = R.plan(gpu(c), arch, max_tokens=348_160, budget_gib=80, host_gib=100)
    assert long["training.offload_activations"] is False, why
    assert any("activations stay on the GPU: in CPU RAM they would need ~90.3 GiB, 100.0 GiB available" in w
               for w in why), why
    assert R.plan(gpu(c), arch, max_tokens=348_160, budget_gib=80, host_gib=124)[0][
        "training.offload_activations"] is True
    assert M.host_available_gib() > 0
    # what the plan ends at is what the estimate says for those settings
    s = E._with(c, training__gradient_checkpointing=True, training__optimizer="paged_adamw_8bit",
                model__embeddings_on_cpu=True)
    on_gpu = E._with(c, training__gradient_checkpointing=True, training__optimizer="paged_adamw_8bit")
    assert M.total_gib(R.for_estimate(on_gpu), arch) - M.total_gib(R.for_estimate(s), arch) == pytest.approx(128256 * 4096 * 2 / 2**30, rel=0.03)
    # fields the user set are left alone
    fixed = cfg(method="qlora", **{"training.micro_batch_size": 1, "training.optimizer": "adamw_torch",
                                    "training.gradient_checkpointing": "true"})
    assert set(R.plan(gpu(fixed), arch, 2048, 7.5, host_gib=16)[0]) == {
        "model.embeddings_on_cpu", "training.offload_activations", "training.tiled_mlp", "training.cudnn_attention",
        "training.mlp_recompute"}  # (at auto: 0, checkpointing was set by hand)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lorastudio.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_one_verdict_the_memory_plans():
    """`lorastudio estimate --gpu-mem` and the Train tab give one verdict on a card: what the memory
    plan would run there (its settings, what each costs in speed), its peak, and whether that fits;
    the static figure is shown only as a comparison. The exit status follows the verdict and is
    documented in --help."""
    mistral = _cli("estimate", "presets/mistral_7b_v0_3_qlora.yaml", "--gpu-mem", "8GB")
    assert mistral.returncode == 0, mistral.stdout + mistral.stderr  # fits with the plan (9.0 GiB without)
    text = mistral.stdout
    est = E.estimate(C.load(ROOT / "presets" / "mistral_7b_v0_3_qlora.yaml"), gpu_mem_gib=8, detect=False)
    plan = est["plan"]
    assert est["fits"] is True and est["static_fits"] is False and plan["total_gib"] <= 8 < est["total_gib"]
    assert f"verdict: fits the 8 GiB card with the memory plan below, estimated peak {plan['total_rounded']} GiB" in text
    assert "NOT" not in text and "may not fit" not in text  # nothing says otherwise
    assert plan["reasons"][-1] == f"estimated peak ~{plan['total_gib']:.1f} GiB of 8.0 GiB"  # the plan's own figure
    for words in ("gradient checkpointing on every layer; speed: up to ~33% more compute",
                  "8-bit AdamW (adamw_bnb_8bit); speed:", "the embedding table in CPU RAM; speed:",
                  "checkpointed activations in CPU RAM"):
        assert words in text, text
    assert f"for comparison, every layer checkpointed with fused AdamW, all on the GPU: {est['total_rounded']} GiB" in text
    assert "to fit:" not in text and "slower with the memory plan's settings" in text
    # the component table is the plan's: its total is the verdict's
    assert f"{'total':<38} {plan['total_gib']:7.2f} GiB" in text
    md = estimate_view.format_markdown(est)
    assert md.startswith(f"**fits the 8 GiB card with the memory plan below: estimated peak {plan['total_rounded']} GiB**")
    assert "NOT" not in md and "8-bit AdamW (adamw_bnb_8bit) — speed:" in md
    # does not fit even with the plan: exit 1, the changes that would fit, each with the plan's peak
    llama = _cli("estimate", "presets/llama3_1_8b_qlora.yaml", "--gpu-mem", "8GB")
    assert llama.returncode == 1 and "even with the memory plan below" in llama.stdout
    assert llama.stdout.count("does NOT fit") == 1 and "to fit:" in llama.stdout
    best = E.estimate(C.load(ROOT / "presets" / "llama3_1_8b_qlora.yaml"), gpu_mem_gib=8, detect=False)["suggestions"][0]
    assert best["fits"] and best["total_gib"] == pytest.approx(
        E.peak_gib(E._with(C.load(ROOT / "presets" / "llama3_1_8b_qlora.yaml"), template__cutoff_len=1024),
                   E.arch_for(LLAMA), 8))
    # a big card: the plan spends memory on speed (no checkpointing), and says it costs nothing
    big = E.estimate(cfg(method="qlora"), detect=False, gpu_mem_gib=80)
    assert big["plan"]["settings"]["training.gradient_checkpointing"] is False
    assert "no gradient checkpointing — speed: no cost" in estimate_view.format_markdown(big)
    # exit status documented where people look; bad input is 2
    helptext = _cli("estimate", "--help").stdout
    assert "0 fits" in helptext and "1 does not fit even with the" in helptext and "2 bad input" in helptext
    assert _cli("estimate", "presets/llama3_1_8b_qlora.yaml", "--gpu-mem", "lots").returncode == 2
    assert _cli("estimate", "no-such-config.yaml").returncode == 2


def test_no_internal_references_in_what_people_read():
    """Estimate texts name what was measured, never an internal document or issue number."""
    for preset, gpu in (("llama3_1_8b_qlora", "8GB"), ("qwen2_5_0_5b_lora", "24GB"), ("qwen2_5_1_5b_lora", None)):
        args = ["estimate", f"presets/{preset}.yaml"] + (["--gpu-mem", gpu] if gpu else [])
        out = _cli(*args)
        md = estimate_view.estimate_markdown(C.load(ROOT / "presets" / f"{preset}.yaml"), gpu)
        for text in (out.stdout + out.stderr, md, _cli("estimate", "--help").stdout):
            assert "docs/" not in text and ".md" not in text and "issue " not in text.lower(), text


def test_tiled_mlp_from_32k_tokens_and_what_it_saves():
    """The memory plan tiles the MLPs from 32k tokens a micro-batch; the estimate then counts one
    tile (4096 tokens on an 8B) of MLP intermediates instead of the whole row."""
    c = cfg(method="qlora", **{"training.micro_batch_size": 1})
    arch = E.arch_for(LLAMA)
    long, why = R.plan(gpu(c), arch, max_tokens=65536, budget_gib=80, host_gib=100)
    assert long["training.tiled_mlp"] is True and any("tiled MLP" in w for w in why), why
    assert R.plan(gpu(c), arch, max_tokens=4096, budget_gib=80, host_gib=100)[0]["training.tiled_mlp"] is False
    # cuDNN attention from the same length (one plan per row length is paid back when attention
    # dominates the step: 1.99 vs 3.15 s per layer forward at 348k tokens, H200, docs/BENCHMARKS.md)
    assert long["training.cudnn_attention"] is True and any("cuDNN attention" in w for w in why), why
    assert R.plan(gpu(c), arch, max_tokens=32767, budget_gib=80, host_gib=100)[0]["training.cudnn_attention"] is False
    user = cfg(method="qlora", **{"training.micro_batch_size": 1, "training.cudnn_attention": "false"})
    assert "training.cudnn_attention" not in R.plan(gpu(user), arch, 65536, 80, host_gib=100)[0]
    at = dict(template__cutoff_len=65536, training__gradient_checkpointing=True)
    plain = M.total_gib(R.for_estimate(E._with(c, training__tiled_mlp=False, **at)), arch)
    tiled = M.total_gib(R.for_estimate(E._with(c, training__tiled_mlp=True, **at)), arch)
    saved = 4 * 2 * 14336 * (65536 - 4096) / 2 ** 30  # gate, up, act, product in bf16, all but one tile
    assert plain - tiled == pytest.approx(saved * (1 + M._fragmentation()), rel=0.02)


def test_reentrant_checkpointing_and_allocator_defaults(monkeypatch):
    """training.checkpoint_reentrant auto: reentrant on one GPU (and wherever activations are
    offloaded), non-reentrant across several; the training child's allocator is the expandable
    one unless PYTORCH_CUDA_ALLOC_CONF says otherwise, and the memory model's margin follows it."""
    assert gpu(cfg()).training.checkpoint_reentrant is True
    multi = cfg(**{"training.gpus": "2", "training.strategy": "ddp"})
    assert gpu(multi).training.checkpoint_reentrant is False
    with pytest.raises(C.ConfigError, match="training.offload_activations: needs checkpoint_reentrant"):
        gpu(cfg(**{"training.offload_activations": "true", "training.checkpoint_reentrant": "false"}))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # records the original, restored after the test
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert M._fragmentation() == M.FRAGMENTATION_EXPANDABLE  # what the child will run with
    M.use_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == M.ALLOC_CONF == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    M.use_allocator()  # the user's own setting is kept
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    assert M._fragmentation() == M.FRAGMENTATION


def test_mlp_recompute_comes_before_checkpointed_layers():
    """training.mlp_recompute (auto, one CUDA GPU, fused LoRA): where the plain layers do not fit,
    the plan first makes the fewest MLPs recompute (a second gate/up matmul on the GPU), and only
    when every MLP is not enough checkpoints the fewest layers, every other MLP recomputing; each
    recomputing MLP saves its intermediates (3 x bI a token with liger) of the estimate, and the
    search's choice fits with headroom where one fewer does not."""
    c = gpu(cfg(method="qlora", **{"training.micro_batch_size": 1}))
    assert c.training.fused_lora is True and c.training.mlp_recompute == "auto"
    arch = E.arch_for(LLAMA)
    need = M._need(c, arch, 2048)
    liger = c.training.kernels == "all"
    mlp, buffer = (3 if liger else 4) * 2 * 14336, (4 if liger else 6) * 2 * 14336  # bytes a token
    frag = 1 + M.FRAGMENTATION_EXPANDABLE
    # the first recomputing MLP saves its intermediates less the buffer of its backward (once)
    assert (need(0, 0) - need(0, 1)) * 2 ** 30 == pytest.approx(2048 * (mlp - buffer) * frag, rel=0.01)
    assert (need(0, 1) - need(0, 2)) * 2 ** 30 == pytest.approx(2048 * mlp * frag, rel=0.01)
    tokens = 2048
    budget = (need(0, 0) + need(0, 32)) / 2 / M.CHECKPOINTING_HEADROOM  # between: MLPs alone are enough
    on, layers, mlps, why = M.checkpointing_decision(c, arch, tokens, budget)
    assert on is False and isinstance(mlps, int) and 0 < mlps < 32, why
    assert need(0, mlps) <= M.CHECKPOINTING_HEADROOM * budget < need(0, mlps - 1)
    assert f"the MLPs of the last {mlps} of 32 layers recompute" in why and "on the GPU alone" in why
    budget = need(8, 24) / M.CHECKPOINTING_HEADROOM + 0.01  # below every MLP: layers too
    on, k, mlps, why = M.checkpointing_decision(c, arch, tokens, budget)
    assert on is True and k == 8 and mlps == "all", why
    assert M.fewest_recompute(c, arch, tokens, budget) == (8, 24)
    assert "on for 8 of 32 layers" in why and "the MLPs of the 24 other layers" in why
    out, why = R.plan(c, arch, tokens, budget, typical_tokens=tokens)
    assert out["training.mlp_recompute"] == "all" and out["training.checkpoint_per_batch"] is True
    # by batch: short batches recompute MLPs alone, long ones checkpoint layers too
    planned = R.fill(c.model_copy(deep=True), out)
    layers = M.layers_by_batch(planned, arch, budget, planned.training.checkpoint_layers)
    assert (layers(256), layers.mlp(256)) == (0, 0)
    searched = planned.model_copy(deep=True)
    searched.training.mlp_recompute = "auto"  # (the plan put the embeddings in CPU RAM: fewer layers now)
    k, m = layers(tokens), layers.mlp(tokens)
    assert (k, m) == M.fewest_recompute(searched, arch, tokens, budget) and 0 < k <= 8 and k + m == 32
    by_length = [(layers(n), layers.mlp(n)) for n in range(256, tokens + 1, 64)]
    assert [k for k, _m in by_length] == sorted(k for k, _m in by_length)
    assert any(k == 0 and 0 < m < 32 for k, m in by_length), by_length  # MLPs alone for middle lengths
    # off: the layers alone, as before; and the plan's estimate matches the static config
    off = gpu(cfg(method="qlora", **{"training.micro_batch_size": 1, "training.mlp_recompute": 0}))
    assert M.checkpointing_decision(off, arch, tokens, budget)[2] == 0
    assert M.fewest_recompute(off, arch, tokens, budget)[1] == 0
    static = gpu(cfg(method="qlora", **{"training.micro_batch_size": 1, "training.mlp_recompute": 5,
                                         "template.cutoff_len": 2048}))
    static = R.fill(static, R.unplanned(static))
    static.training.gradient_checkpointing = False
    assert M.breakdown(static, arch)["resolved"]["mlp_recompute_layers"] == 5
    assert M.total_gib(static, arch) == pytest.approx(need(0, 5))


def test_mlp_recompute_auto_and_refusals():
    """auto: 0 on CPU, on several GPUs and without fused LoRA (dropout, DoRA); asked for, it needs
    fused LoRA layers; tiled MLPs (long rows) leave the plan no MLP to recompute."""
    assert R.resolve(C.from_dict({"training": {"device": "cpu"}})).training.mlp_recompute == 0
    assert gpu(cfg(**{"lora.dropout": 0.1})).training.mlp_recompute == 0
    assert gpu(cfg(**{"training.gpus": 2})).training.mlp_recompute == 0
    assert gpu(cfg()).training.mlp_recompute == "auto"
    with pytest.raises(C.ConfigError, match="training.mlp_recompute: needs fused LoRA"):
        gpu(cfg(**{"training.mlp_recompute": "all", "lora.dropout": 0.1}))
    with pytest.raises(C.ConfigError, match="training.mlp_recompute: needs fused LoRA"):
        gpu(cfg(method="full", **{"training.mlp_recompute": "4"}))
    arch = E.arch_for(LLAMA)
    long, why = R.plan(gpu(cfg(method="qlora")), arch, max_tokens=65_536, budget_gib=40, host_gib=200)
    assert long["training.tiled_mlp"] is True and long["training.mlp_recompute"] == 0, why
