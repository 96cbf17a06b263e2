"""core.optim: bitsandbytes' 8-bit AdamW stepped without a device sync per tensor gives
bitsandbytes' own numbers, state and checkpoints; the product's Trainer builds it for the 8-bit
optimizer names and leaves every other optimizer alone. CPU (the CUDA entry point is compared
bit for bit by bench/optim_check.py on the device)."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from lorastudio.core import optim as optim_lib  # noqa: E402
from lorastudio.core import trainer as trainer_lib  # noqa: E402


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    # LoRA-like shapes (8-bit blockwise state from 4,096 elements), one small tensor (32-bit state),
    # two groups as the Trainer makes them (decay / no decay)
    shapes = [(64, 256), (256, 64), (64, 128), (16,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]


def _groups(ps):
    return [{"params": ps[:3], "weight_decay": 0.01}, {"params": ps[3:], "weight_decay": 0.0}]


def _run(cls, steps, ps, opt=None, skip_at=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = opt or cls(_groups(ps), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, optim_bits=8)
    for i in range(steps):
        for j, p in enumerate(ps):
            grad = torch.randn(p.shape, generator=g)
            p.grad = None if (i == skip_at and j == 1) else grad  # a tensor without a gradient is skipped
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


@pytest.mark.parametrize("paged", [False, True])
def test_no_sync_adamw8bit_equals_bitsandbytes(paged):
    base = bnb.optim.PagedAdamW if paged else bnb.optim.AdamW
    lean = optim_lib.without_syncs(base)
    assert lean is not base and issubclass(lean, base) and optim_lib.without_syncs(lean) is lean
    ref_p, new_p = _params(), _params()
    ref = _run(base, 6, ref_p)
    new = _run(lean, 6, new_p)
    for a, b in zip(ref_p, new_p):
        assert torch.equal(a, b)
    assert new.state[new_p[0]]["state1"].dtype == torch.uint8  # 8-bit state, as bitsandbytes keeps it
    assert new.state[new_p[3]]["state1"].dtype == torch.float32  # (16 elements: 32-bit state)
    assert new.state[new_p[1]]["step"] == ref.state[ref_p[1]]["step"] == 5  # skipped once, as bitsandbytes
    # a checkpoint of one loads into the other and both go on alike (the Trainer's resume)
    sd = new.state_dict()
    again_p = [torch.nn.Parameter(p.detach().clone()) for p in new_p]
    again = bnb.optim.AdamW(_groups(again_p), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, optim_bits=8)
    again.load_state_dict(sd)
    _run(None, 3, again_p, opt=again, skip_at=-1, seed=7)
    _run(None, 3, new_p, opt=new, skip_at=-1, seed=7)
    for a, b in zip(again_p, new_p):
        assert torch.equal(a, b)


def test_the_trainer_builds_the_no_sync_class_for_8bit_names_only(tmp_path):
    from transformers import TrainingArguments

    Lean = trainer_lib.trainer_class(False)
    for name, paged in (("adamw_bnb_8bit", False), ("adamw_8bit", False), ("paged_adamw_8bit", True)):
        args = TrainingArguments(output_dir=str(tmp_path), optim=name, use_cpu=True, report_to=[])
        cls, kw = Lean.get_optimizer_cls_and_kwargs(args)
        assert issubclass(cls, optim_lib._NoSyncSteps) and issubclass(cls, bnb.optim.AdamW), name
        assert kw["optim_bits"] == 8 and kw["is_paged"] is paged
    args = TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", use_cpu=True, report_to=[])
    assert Lean.get_optimizer_cls_and_kwargs(args)[0] is torch.optim.AdamW
    assert optim_lib.without_syncs(bnb.optim.Lion) is bnb.optim.Lion  # (not an AdamW: left as it is)

