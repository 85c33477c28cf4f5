"""Evaluation metrics (docs/design.md §2.8): pure functions of embeddings.

Math only here (fast import); the embedding models live in ``metrics.wav2clip`` (audio),
``metrics.clip_image`` (CLIP image features) and ``metrics.inception`` (FID features), and the evaluation
command in ``metrics.evaluate``.
"""

from metrics.fid import feature_statistics, fid, frechet_distance
from metrics.scores import Similarity, ais, cosine_matrix, giils, iis, score

__all__ = ["Similarity", "ais", "cosine_matrix", "feature_statistics", "fid", "frechet_distance", "giils", "iis", "score"]
