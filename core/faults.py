"""Fault injection for the tests (LORASTUDIO_FAULTS): the training child fails, stalls or dies at
a named point, so recovery is tested against the real trainer."""

from __future__ import annotations


def install_faults(spec: str) -> None:
    """Fault injection for tests, e.g. LORASTUDIO_FAULTS="enospc_on_save=2,oom_at_step=3": drives the
    real error paths for a full disk (mid-checkpoint) and CUDA out-of-memory on any machine."""
    import errno

    import torch
    from transformers import Trainer

    faults = dict(item.split("=") for item in spec.split(",") if "=" in item)
    if "enospc_on_save" in faults:
        nth, calls = int(faults["enospc_on_save"]), {"n": 0}
        orig_rng = Trainer._save_rng_state

        def save_rng(self, output_dir):  # runs mid-checkpoint: weights+optimizer already written
            calls["n"] += 1
            if calls["n"] == nth:
                raise OSError(errno.ENOSPC, "No space left on device (simulated)", output_dir)
            return orig_rng(self, output_dir)

        Trainer._save_rng_state = save_rng
    if "oom_at_step" in faults:
        at, orig_step = int(faults["oom_at_step"]), Trainer.training_step

        def step(self, *args, **kwargs):
            if self.state.global_step + 1 >= at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return orig_step(self, *args, **kwargs)

        Trainer.training_step = step
