"""metrics.samplers: other samplers against PNDM-50 from the same noise, on the tiny demo models."""

import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

from metrics import samplers
from mtok_jax import errors

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_sampler_specs_and_psnr():
    assert samplers.parse_sampler("dpm:20") == ("dpm", 20)
    for bad in ("dpm", "dpm:0", "heun:20", "dpm:x"):
        with pytest.raises(errors.UserError, match="--reference: .* KIND:STEPS"):
            samplers.parse_sampler(bad, "--reference")
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] += 1  # MSE 1: 20·log10(255)
    db = samplers.psnr_db(b, a)
    assert db[0] == pytest.approx(20 * math.log10(255)) and db[1] == samplers.IDENTICAL_DB


def test_more_steps_agree_more_with_pndm_50(tiny_assets, tmp_path):
    """DPM-Solver++ at 20 steps is closer to PNDM-50 than at 4 (the solvers converge to one ODE's
    solution); the loop lengths, the table and the grid (a row per sampler) are as documented."""
    out = tmp_path / "out"
    records = samplers.main([
        "--config", str(REPO / "configs" / "demo.py"), f"--config.model.sd_path={tiny_assets['sd']}",
        f"--config.model.beats_path={tiny_assets['beats']}", f"--config.data.data_dir={tiny_assets['data']}",
        "--config.data.builder_config=tiny", "--config.data.clip_seconds=1.0", "--workdir", str(tmp_path / "run"),
        "--checkpoint", "none", "--samplers", "dpm:4,dpm:20", "--reference", "pndm:50", "--out", str(out)])
    by_name = {r["sampler"]: r for r in records}
    assert [r["sampler"] for r in records] == ["pndm:50", "dpm:4", "dpm:20"]
    assert [r["unet_passes"] for r in records] == [51, 4, 20]
    assert by_name["pndm:50"]["psnr_db"] is None and by_name["pndm:50"]["mean_abs_diff"] == 0
    assert by_name["dpm:20"]["psnr_db"] > by_name["dpm:4"]["psnr_db"] + 3, records
    assert by_name["dpm:20"]["mean_abs_diff"] < by_name["dpm:4"]["mean_abs_diff"], records
    saved = json.loads((out / "samplers.json").read_text())
    assert saved["samplers"] == records and len(saved["audio"]) == 3  # one held-out clip per tiny label
    assert "| dpm:20 | 20 |" in (out / "samplers.md").read_text()
    assert Image.open(out / "grid.png").size == (3 * 128, 3 * (128 + 26))  # 3 clips × 3 samplers
