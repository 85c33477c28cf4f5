"""demo.label_dependence: the demo's check that generated images follow their labels."""

import json

import numpy as np
from PIL import Image

from demo import _sample_label_dependence, label_dependence

TARGETS = np.random.default_rng(0).uniform(0, 1, (18, 3))


def test_label_dependence_separates_following_from_ignoring():
    follows = label_dependence(0.5 * TARGETS + 0.1, TARGETS)  # colours follow labels (other scale/offset)
    assert np.isclose(follows["colour_corr"], 1.0) and np.isclose(follows["spread"], 0.5 * follows["label_spread"])
    same = label_dependence(np.tile([0.4, 0.2, 0.6], (18, 1)), TARGETS)  # every label the same picture
    assert same["spread"] < 1e-12 and abs(same["colour_corr"]) < 1e-9 and same["label_spread"] > 0.3
    flipped = label_dependence(1.0 - TARGETS, TARGETS)
    assert np.isclose(flipped["colour_corr"], -1.0)


def test_sample_label_dependence_reads_pngs(tmp_path):
    records = []
    for i, (label, rgb) in enumerate((("red", (200, 30, 30)), ("blue", (30, 30, 200)))):
        d = tmp_path / "manual" / "image" / label
        d.mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), rgb, np.uint8)).save(d / "a.png")
        Image.fromarray(np.full((4, 4, 3), [c // 2 for c in rgb], np.uint8)).save(tmp_path / f"s{i}.png")
        records.append({"image": f"s{i}.png", "label": label})
    (tmp_path / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    dep = _sample_label_dependence(records, str(tmp_path), str(tmp_path / "manual"))
    assert np.isclose(dep["colour_corr"], 1.0) and 0.0 < dep["spread"] < dep["label_spread"]
