"""The exp1 feature cache (mtok_jax.data.cache, mtok_jax.data.features): the cached step's loss is the
uncached one's, a stale cache is refused, an interrupted build resumes, and it is off where it cannot apply."""

import numpy as np
import pytest

import jax

from mtok_jax import system as system_lib
from mtok_jax import train
from mtok_jax import tree as tree_lib
from mtok_jax.data import cache, features, pipeline
from test_train import LABELS, demo_config


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory):
    """A float32 cache of the tiny dataset in a folder of its own → (config, system, params, store)."""
    folder = tmp_path_factory.mktemp("feature_cache")
    config = demo_config(tiny_assets, f"data.feature_cache_dir={folder}", "data.feature_cache_dtype=float32")
    system, params = system_lib.load_system(config, LABELS)
    return config, system, params, cache.ensure(config, system, params, progress=False)


def test_cached_loss_equals_uncached(setup, tiny_assets):
    config, system, params, store = setup
    assert store.missing() == {} and set(features.arrays(store.meta)) == {
        "features.train", "features.validation", "features.test", "moments.train_images", "moments.validation",
        "moments.test"}
    kw = dict(global_batch_size=4, seed=0, epoch=1, config_name="tiny", prefetch=0)
    plain = next(iter(pipeline.batches(tiny_assets["data"], "train", **kw)))
    cached = next(iter(pipeline.batches(tiny_assets["data"], "train", features=store, **kw)))
    assert set(cached) == {"features", "moments", "label"} and np.array_equal(cached["label"], plain["label"])
    want = system_lib.beats_features(system, params, plain["audio"], rng=jax.random.key(0), train=False)
    np.testing.assert_allclose(cached["features"], np.asarray(want), atol=1e-5, rtol=1e-5)

    trainable, frozen = tree_lib.split_params(params, config.train.trainable)
    keys = system_lib.example_keys(jax.random.key(3), 4)
    loss, terms = train.system_loss(system, trainable, frozen, plain, keys)
    cached_loss, cached_terms = train.system_loss(system, trainable, frozen, cached, keys)
    assert abs(float(cached_loss) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss))), (cached_loss, loss)
    for k in terms:
        np.testing.assert_allclose(float(cached_terms[k]), float(terms[k]), rtol=1e-5, atol=1e-7)
    # another draw of the noise gives another loss: the comparison can fail
    other, _ = train.system_loss(system, trainable, frozen, cached, system_lib.example_keys(jax.random.key(4), 4))
    assert abs(float(other) - float(loss)) > 1e-4


def test_stale_cache_refused(setup, tiny_assets):
    config, system, params, store = setup
    folder = config.data.feature_cache_dir
    other = demo_config(tiny_assets, f"data.feature_cache_dir={folder}", "data.feature_cache_dtype=float32",
                        "model.beats_layers=(0, 2)")
    other_system, other_params = system_lib.load_system(other, LABELS)
    with pytest.raises(features.StaleCacheError, match=r"beats_layers=\[1, 2, 3\].*\[0, 2\].*mtok_jax.data.cache "
                                                       r"--config CONFIG --overwrite"):
        cache.ensure(other, other_system, other_params, progress=False)
    retrained = jax.tree.map(lambda x: x, params)
    retrained["beats"] = jax.tree.map(lambda x: x * 1.001, params["beats"])
    with pytest.raises(features.StaleCacheError, match="beats_weights"):
        cache.ensure(config, system, retrained, progress=False)
    for key, value in (("clip_samples", 32000), ("image_hw", [64, 64])):
        with pytest.raises(features.StaleCacheError, match=key):
            features.check(store, {**store.meta, key: value})
    assert cache.ensure(config, system, params, progress=False).missing() == {}  # the right config still reads it


def test_interrupted_build_resumes(setup, tiny_assets, tmp_path, monkeypatch):
    config, system, params, store = setup
    config = demo_config(tiny_assets, f"data.feature_cache_dir={tmp_path}", "data.feature_cache_dtype=float32",
                         "train.batch_size=2")
    real, calls = features.FeatureStore.mark_done, []

    def interrupted(self, name, done, process):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(name)
        real(self, name, done, process)

    monkeypatch.setattr(features.FeatureStore, "mark_done", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.ensure(config, system, params, progress=False)
    monkeypatch.undo()
    partial = features.open_store(str(tmp_path))
    assert 0 < sum(partial.done(name).sum() for name in features.arrays(partial.meta)) < sum(
        shape[0] for shape, _ in features.arrays(partial.meta).values())
    resumed = cache.ensure(config, system, params, progress=False)
    assert resumed.missing() == {}
    for name in features.arrays(store.meta):
        np.testing.assert_allclose(np.asarray(resumed.array(name)), np.asarray(store.array(name)), atol=1e-6)


def test_off_where_it_cannot_apply(setup, tiny_assets):
    _, _, params, _ = setup
    assert cache.disabled_reason(demo_config(tiny_assets), params) is None  # embedder|unet train
    assert "beats" in cache.disabled_reason(demo_config(tiny_assets, "train.trainable=embedder|beats"), params)
    assert "vae" in cache.disabled_reason(demo_config(tiny_assets, "train.trainable=embedder|vae/decoder"), params)
    assert "beats_train_mode" in cache.disabled_reason(demo_config(tiny_assets, "model.beats_train_mode=True"),
                                                       params)
    assert "off" in cache.disabled_reason(demo_config(tiny_assets, "data.feature_cache=False"), params)
