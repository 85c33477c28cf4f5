"""lr schedules of the thesis configs against diffusers' `get_scheduler` (what the thesis train script calls),
stepped as the script stepped it: once per optimizer update, lr of update k = the lr after k scheduler steps."""

import pathlib
import warnings

import numpy as np
import pytest

from conftest import torch_or_skip
from mtok_jax import config_utils, train
from mtok_jax.data import pipeline

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
TRAIN_CLIPS = 19_366  # thesis train split
SCRIPT_WARMUP = 500  # the script's lr_warmup_steps default


def diffusers_lrs(name: str, peak: float, warmup: int, total: int, steps: list[int]) -> list[float]:
    """lr of update k for each k in steps, from a real torch optimizer + diffusers scheduler stepped k times."""
    torch = torch_or_skip()
    from diffusers.optimization import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_scheduler(name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=total)
    out, k = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step()
        for target in sorted(steps):
            while k < target:
                sched.step()
                k += 1
            out.append(opt.param_groups[0]["lr"])
    return out


def ours(config, steps_per_epoch: int, steps: list[int]) -> np.ndarray:
    schedule = train.learning_rate(config.train, steps_per_epoch)
    return np.array([float(schedule(k)) for k in sorted(steps)])


@pytest.mark.parametrize("name", ["exp1", "exp2", "prelim1", "prelim2"])
def test_thesis_schedules_equal_diffusers(name):
    """Our default schedules = the script's get_scheduler(lr_scheduler, lr_warmup_steps=500) per update:
    cosine warms up over 500 updates, constant ignores the warm-up."""
    c = config_utils.load_config(CONFIG_DIR / f"{name}.py")
    t = c.train
    spe = pipeline.num_batches(TRAIN_CLIPS, t.batch_size * t.grad_accum)
    total = t.epochs * spe
    steps = [0, 250, 500, 5000, total - 1]
    want = diffusers_lrs(t.schedule, t.lr, SCRIPT_WARMUP, total, steps)
    np.testing.assert_allclose(ours(c, spe, steps), want, rtol=2e-6, atol=1e-13)
    if t.schedule == "cosine":
        assert want[0] == 0.0 and want[2] == pytest.approx(t.lr) and want[-1] < 1e-3 * t.lr


def test_prelim2_micro_batch_sizing_quirk():
    """train.schedule_sized_in_micro_batches: the script sized warm-up and length for max_train_steps ×
    accumulation (500·4 warm-up, total·4) while stepping once per update; the run ends at ≈86 % of the peak."""
    c = config_utils.load_config(CONFIG_DIR / "prelim2.py", ["train.schedule_sized_in_micro_batches=True"])
    t = c.train
    spe = pipeline.num_batches(TRAIN_CLIPS, t.batch_size * t.grad_accum)
    total = t.epochs * spe
    steps = [0, 250, 500, 5000, total - 1]
    want = diffusers_lrs("cosine", t.lr, SCRIPT_WARMUP * t.grad_accum, total * t.grad_accum, steps)
    got = ours(c, spe, steps)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-13)
    assert 0.85 * t.lr < got[-1] < 0.87 * t.lr
    assert got[2] == pytest.approx(t.lr * 500 / 2000, rel=1e-6)  # still warming up at update 500
