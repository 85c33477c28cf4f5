"""metrics.demo_models: the contrastive fit makes the tiny CLIP / Wav2CLIP tell matched demo
(audio, image) pairs from mismatched ones (AIS, IIS ≫ 50 on fresh pairs), which the random towers do not
(≈ 50), so the demo's evaluation can show whether images follow their music."""

import numpy as np

from metrics import scores
from metrics.clip_image import load_clip_image, resize_and_crop
from metrics.wav2clip import embed_audio, load_wav2clip
from metrics import demo_models as mm
from metrics.demo_models import write_tiny_wav2clip


def test_fit_separates_matched_from_mismatched(tmp_path):
    clip = load_clip_image(mm.write_tiny_clip(tmp_path / "clip"))
    w2c = load_wav2clip(write_tiny_wav2clip(tmp_path / "wav2clip"))
    clip_params, w2c_vars, history = mm.fit_metric_models(clip, w2c, steps=40, per_label=2)
    assert history[-1][1] < 0.6 * history[0][1]
    _, audio, images = mm.demo_pairs(1, seed=123)  # fresh clips / images, one per label, row i paired
    _, _, images2 = mm.demo_pairs(1, seed=456)
    pixels = np.stack([resize_and_crop(im, clip.pp) for im in images])
    pixels2 = np.stack([resize_and_crop(im, clip.pp) for im in images2])

    def metric_scores(cp, wv):
        img, img2 = np.asarray(clip.features(cp, pixels)), np.asarray(clip.features(cp, pixels2))
        aud = np.asarray(embed_audio(w2c[0], wv, audio, normalization="item", config=w2c[2]))
        return float(scores.ais(aud, img).score), float(scores.iis(img2, img).score)

    random_ais, random_iis = metric_scores(clip.params, w2c[1])
    fitted_ais, fitted_iis = metric_scores(clip_params, w2c_vars)
    assert abs(random_ais - 50) < 3 and fitted_ais > 58, (random_ais, fitted_ais)
    assert fitted_iis > random_iis + 5 and fitted_iis > 58, (random_iis, fitted_iis)
