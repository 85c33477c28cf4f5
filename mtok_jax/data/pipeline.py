"""Training/eval input pipeline over a built `music_image` dataset (array_record via `as_data_source`).

Contract (what the trainer codes against):
- `num_examples(data_dir, split, config_name=None) -> int`
- `batches(data_dir, split, *, global_batch_size, seed, epoch, start_batch=0, shuffle=True,
  drop_remainder=True, bgr=False, rows=None, micro_batches=1, config_name=None)`
  yields host-local numpy batches {'audio': float32 [b, N] in [-1, 1), 'image': float32 [b, H, W, 3]
  in [-1, 1], 'label': int32 [b]} (+ 'mask' float32 [b] when drop_remainder=False), b = the rows
  of the global batch this host loads (global_batch_size / process_count by default).
- `to_global(batch, sharding) -> dict of jax.Array`; `on_devices(batches, sharding)`: the same, one
  batch ahead (its transfer overlaps the step).
- `batches(..., features=store)`: the exp1 feature cache's 'features' and 'moments' instead of 'audio'
  and 'image' (mtok_jax.data.features).

Determinism: the split is shuffled globally with (seed, epoch) and cut into global batches; each
host loads only its rows of each (the rows its devices hold); training images are re-paired per
epoch with (seed, epoch): `train_pairing`. So (seed, epoch, start_batch) fixes every global batch,
whatever the number of processes: a resumed run (same epoch, start_batch = batches already
consumed) continues the same order, also on another process count.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import functools
import json
import logging
import queue
import threading
from pathlib import Path
from typing import Iterator, Mapping, Optional

import numpy as np

from mtok_jax import config_utils
from mtok_jax.audio.io import from_pcm16
from mtok_jax.data.sources import NAME, VERSION, check_config_name, dataset_dir
from mtok_jax.data.images import decode_image

log = logging.getLogger("mtok_jax.data")

_PAIRING_SALT = 0x9A1B
_SHUFFLE_SALT = 0x5EED


def resolve_config(data_dir, config_name: Optional[str] = None, shapes: Optional[Mapping] = None) -> str:
    """`config_name`; when None, the config built under data_dir whose metadata matches `shapes` (e.g.
    {'clip_samples': 480000, 'image_height': 512, 'image_width': 512}), or the only one built."""
    if config_name:
        return check_config_name(config_name)
    found = sorted(p.parent.parent.name for p in Path(data_dir).glob(f"{NAME}/*/{VERSION}/dataset_info.json"))
    if shapes and found:
        built = {n: _built_shapes(data_dir, n) for n in found}
        match = [n for n, got in built.items() if all(got.get(k) == v for k, v in shapes.items())]
        if len(match) == 1 or len(found) == 1:
            return (match or found)[0]
        raise FileNotFoundError(f"{data_dir}: {'several' if match else 'no'} built {NAME} configs match the config's "
                                f"{dict(shapes)}; set data.builder_config to one of " + "; ".join(
                                    f"{n} {built[n]}" for n in (match or found)))
    if len(found) != 1:
        raise FileNotFoundError(f"{data_dir}: set data.builder_config; built {NAME} configs: {found or 'none'}")
    return found[0]


def _built_shapes(data_dir, config_name: str) -> dict:
    """The shapes a built config holds ({'clip_samples', 'image_height', 'image_width'}, from its metadata)."""
    meta = json.loads((dataset_dir(data_dir, config_name) / "metadata.json").read_text(encoding="utf-8"))
    return {k: int(meta["config"][k]) for k in ("clip_samples", "image_height", "image_width")}


@dataclasses.dataclass
class Dataset:
    """A built dataset opened for reading: its dir, metadata.json and the TFDS read-only builder."""
    path: Path
    meta: dict
    builder: object
    _sources: dict = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @property
    def label_names(self) -> list[str]:
        return self.meta["config"]["labels"]

    def has_split(self, split: str) -> bool:
        return split in self.meta["splits"]

    def labels(self, split: str) -> np.ndarray:
        """int32 [n] label of every record of the split (from metadata, no record reads)."""
        if not self.has_split(split):
            return np.zeros((0,), np.int32)
        return np.asarray(self.meta["splits"][split]["labels"], np.int32)

    def source(self, split: str):
        """The split's random-access data source (`builder.as_data_source`)."""
        with self._lock:
            if split not in self._sources:
                if not self.has_split(split):
                    raise KeyError(f"{self.path}: no split '{split}' (have {sorted(self.meta['splits'])})")
                self._sources[split] = self.builder.as_data_source(split=split)
            return self._sources[split]


@functools.lru_cache(maxsize=32)
def _open(path: str, stamp: int) -> Dataset:
    import tensorflow_datasets as tfds

    meta = json.loads((Path(path) / "metadata.json").read_text(encoding="utf-8"))
    return Dataset(Path(path), meta, tfds.builder_from_directory(path))


def open_dataset(data_dir, config_name: Optional[str] = None, shapes: Optional[Mapping] = None) -> Dataset:
    """Open DATA_DIR/music_image/<config>/<version> (:func:`resolve_config`; cached per process, refreshed
    after a rebuild)."""
    path = dataset_dir(data_dir, resolve_config(data_dir, config_name, shapes))
    info = path / "dataset_info.json"
    if not info.exists():
        raise FileNotFoundError(f"{path}: no built dataset (run python -m mtok_jax.data.build)")
    return _open(str(path), info.stat().st_mtime_ns)


def open_configured(config) -> Dataset:
    """The dataset a config trains on: `data.builder_config`, or ("") the built config whose clip length
    and image size are the config's."""
    h, w = config_utils.image_hw(config)
    return open_dataset(config.data.data_dir, config.data.builder_config or None,
                        shapes={"clip_samples": config_utils.clip_samples(config), "image_height": h, "image_width": w})


def configured_labels(config) -> tuple[str, ...]:
    """Label names of the dataset `config` trains on (:func:`open_configured`); () when none is built
    (logged: outputs are then named without labels)."""
    try:
        return tuple(open_configured(config).label_names)
    except FileNotFoundError as e:
        log.warning("no label names (%s): images are named and listed without labels", e)
        return ()


def num_examples(data_dir, split: str, config_name: Optional[str] = None) -> int:
    """Number of records of a split (0 for a split that has none)."""
    return int(open_dataset(data_dir, config_name).labels(split).shape[0])


def train_pairing(audio_labels: np.ndarray, image_labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """For each train audio, the index of a uniformly drawn train image of the same label.

    Drawn with numpy's PCG64 seeded by (seed, epoch): one epoch is reproducible, epochs differ.
    """
    rng = np.random.default_rng([int(seed), int(epoch), _PAIRING_SALT])
    out = np.full(audio_labels.shape, -1, np.int64)
    for label in np.unique(audio_labels):
        rows = np.flatnonzero(audio_labels == label)
        pool = np.flatnonzero(image_labels == label)
        if pool.size == 0:
            raise ValueError(f"label {label} has train audio but no train image")
        out[rows] = pool[rng.integers(0, pool.size, size=rows.size)]
    return out


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """int64 [n]: the global order of a split's records in one epoch (shuffled by (seed, epoch)); the same
    whatever the number of processes, so a run can resume on another process count."""
    idx = np.arange(n, dtype=np.int64)
    if shuffle:
        idx = np.random.default_rng([int(seed), int(epoch), 0, _SHUFFLE_SALT]).permutation(idx)
    return idx


def num_batches(n: int, global_batch_size: int, drop_remainder: bool = True) -> int:
    """Global batches per epoch (the last one padded when not drop_remainder)."""
    return n // global_batch_size if drop_remainder else -(-n // global_batch_size)


def default_rows(global_batch_size: int) -> np.ndarray:
    """This process's contiguous share of a global batch: rows [p·b, (p+1)·b), b = size / processes."""
    import jax

    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ValueError(f"global_batch_size {global_batch_size} not divisible by {count} processes")
    b = global_batch_size // count
    return np.arange(index * b, (index + 1) * b, dtype=np.int64)


def image_to_float(image: np.ndarray, bgr: bool = False) -> np.ndarray:
    """uint8 [..., H, W, 3] → float32 in [-1, 1] (x/127.5 − 1); `bgr` swaps R and B (thesis quirk)."""
    x = image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return x[..., ::-1] if bgr else x


def _prefetch(gen: Iterator, size: int) -> Iterator:
    """Run `gen` in a daemon thread, `size` items ahead; errors re-raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name="mtok-data-prefetch")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def batches(data_dir, split: str, *, global_batch_size: int, seed: int, epoch: int, start_batch: int = 0,
            shuffle: bool = True, drop_remainder: bool = True, bgr: bool = False,
            rows: Optional[np.ndarray] = None, micro_batches: int = 1, config_name: Optional[str] = None,
            prefetch: int = 2, threads: int = 4, features=None) -> Iterator[dict]:
    """This host's part of each global batch of one epoch, from batch `start_batch` on (module docstring).

    Global batch k is records order[k·G : (k+1)·G] (G = global_batch_size) of `epoch_order`, cut into
    `micro_batches` consecutive micro-batches of M = G / micro_batches; the host loads rows `rows` of
    each micro-batch (indices in [0, M), e.g. `sharding.process_rows`; default `default_rows(M)`) and
    yields them micro-batch after micro-batch ([micro_batches · len(rows)] examples).
    'train' pairs each audio with a same-label train image drawn per (seed, epoch); 'validation' /
    'test' use the pairing stored in the dataset. drop_remainder=False pads the last global batch
    with copies of its first example and adds 'mask' (1 real, 0 padding).
    `features`: an open feature cache (mtok_jax.data.features.FeatureStore): batches then hold its
    'features' [b, T, C] and 'moments' [b, h, w, 2C] of the same examples instead of 'audio' and 'image'.
    """
    if global_batch_size % micro_batches:
        raise ValueError(f"global_batch_size {global_batch_size} not divisible into {micro_batches} micro-batches")
    micro = global_batch_size // micro_batches
    rows = default_rows(micro) if rows is None else np.asarray(rows, np.int64)
    ds = open_dataset(data_dir, config_name)
    labels = ds.labels(split)
    n = labels.shape[0]
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    total = num_batches(n, global_batch_size, drop_remainder)
    if n == 0 or total == 0:
        return iter(())
    src = ds.source(split)
    pairing, image_src = None, None
    if split == "train":
        pairing = train_pairing(labels, ds.labels("train_images"), seed, epoch)
        image_src = ds.source("train_images")
    # positions within a global batch that this host loads
    positions = (np.arange(micro_batches)[:, None] * micro + rows[None, :]).ravel()

    def one(i):
        image_index = int(pairing[i]) if pairing is not None else int(i)
        if features is not None:
            return {"features": features.features(split, int(i)), "moments": features.moments(split, image_index)}
        rec = src[int(i)]
        image_rec = image_src[image_index] if pairing is not None else rec
        return {"audio": record_audio(rec),
                "image": record_image(image_rec, f"{ds.path}: split '{split}' record {i}", bgr)}

    def produce():
        with cf.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for k in range(start_batch, total):
                at = k * global_batch_size + positions
                real = at < n
                ids = order[np.where(real, at, k * global_batch_size)]  # padding: the batch's first example
                items = list(pool.map(one, ids))
                out = {k: np.stack([item[k] for item in items]) for k in items[0]}
                out["label"] = labels[ids].astype(np.int32)
                if not drop_remainder:
                    out["mask"] = real.astype(np.float32)
                yield out

    return _prefetch(produce(), prefetch)


def record_audio(rec: Mapping) -> np.ndarray:
    """A record's clip → float32 [clip_samples] in [-1, 1)."""
    return from_pcm16(rec["audio"])


def record_image(rec: Mapping, where: str, bgr: bool = False) -> np.ndarray:
    """A record's image → float32 [H, W, 3] in [-1, 1]; `where` names the record in the error for none."""
    if not rec["image"]:
        raise ValueError(f"{where} has no image")
    return image_to_float(decode_image(rec["image"]), bgr)


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict:
    """Host-local batch → global jax.Arrays (`jax.make_array_from_process_local_data`).

    `sharding`: one Sharding for every key (a NamedSharding's spec is cut to each array's rank, so
    P(('data', 'fsdp')) or P('data', None, None, None) both work) or a dict key → Sharding.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    out = {}
    for key, value in batch.items():
        s = sharding[key] if isinstance(sharding, Mapping) else sharding
        if isinstance(s, NamedSharding) and len(s.spec) > np.ndim(value):
            s = NamedSharding(s.mesh, PartitionSpec(*s.spec[:np.ndim(value)]))
        out[key] = jax.make_array_from_process_local_data(s, np.asarray(value))
    return out


def on_devices(host_batches: Iterator[Mapping[str, np.ndarray]], sharding, ahead: int = 1) -> Iterator[dict]:
    """`to_global` of each batch, `ahead` batches before it is consumed: the next batch's transfer to the
    devices is under way while the current step runs. Closing it closes `host_batches`."""
    queued: collections.deque = collections.deque()
    try:
        for batch in host_batches:
            queued.append(to_global(batch, sharding))
            if len(queued) > ahead:
                yield queued.popleft()
        while queued:
            yield queued.popleft()
    finally:
        getattr(host_batches, "close", lambda: None)()


def iter_examples(data_dir, split: str, config_name: Optional[str] = None, *, seed: int = 0, epoch: int = 0
                  ) -> Iterator[dict]:
    """Yield every example of a built split as a dict (stored order; also `mtok_jax.data.load_examples`).

    Keys: 'audio' float32 [clip_samples] in [-1, 1) (16 kHz; 44.1 kHz with the quirk config),
    'image' uint8 [H, W, 3] RGB, 'label' int, 'audio_id' / 'image_id' (source paths relative to the
    manual dir). 'train' shows the (seed, epoch) training pairing; 'validation'/'test' the stored
    pairing; '<split>_images' yields image-only dicts (no 'audio', 'audio_id').
    `config_name` may be omitted when data_dir holds a single built config.
    """
    ds = open_dataset(data_dir, config_name)
    src = ds.source(split)
    is_images = split.endswith("_images")
    pairing = None
    if split == "train":
        pairing = train_pairing(ds.labels("train"), ds.labels("train_images"), seed, epoch)
        image_src = ds.source("train_images")
    for i in range(len(src)):
        rec = src[i]
        ex = {"label": int(rec["label"]), "image_id": rec["image_id"].decode("utf-8")}
        image_bytes = rec["image"]
        if pairing is not None:
            img_rec = image_src[int(pairing[i])]
            image_bytes, ex["image_id"] = img_rec["image"], img_rec["image_id"].decode("utf-8")
        ex["image"] = decode_image(image_bytes)
        if not is_images:
            ex["audio"] = from_pcm16(rec["audio"])
            ex["audio_id"] = rec["audio_id"].decode("utf-8")
        yield ex
