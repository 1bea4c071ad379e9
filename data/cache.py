"""On-disk caches: one ``datasets`` dataset plus an ``hqdm_meta.json`` in one folder, written atomically.

Layout of ``cache_dir``: the files of ``Dataset.save_to_disk`` and, beside them, ``hqdm_meta.json``. Everything is
written into a temporary sibling folder and renamed into place last, so ``cache_dir`` either holds a complete
cache or does not exist: an interrupted write leaves nothing half-written behind (at most a ``.<name>.tmp-*``
sibling, removed on the way out when Python can still run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np

META_FILE = "hqdm_meta.json"
CHUNK_ROWS = 4096  # rows per in-memory chunk while writing; bounds memory for large caches


def is_cache(cache_dir: str) -> bool:
    """True when ``cache_dir`` holds a complete cache (the meta file is written last)."""
    return os.path.isfile(os.path.join(os.path.expanduser(cache_dir), META_FILE))


def read_meta(cache_dir: str) -> dict:
    """The meta dict of a cache."""
    with open(os.path.join(os.path.expanduser(cache_dir), META_FILE)) as f:
        return json.load(f)


def load_cache(cache_dir: str):
    """``(datasets.Dataset, meta)`` of a complete cache; the table is memory-mapped, not read into memory."""
    import datasets

    return datasets.load_from_disk(os.path.expanduser(cache_dir)), read_meta(cache_dir)


def rechunk(batches: Iterable[dict[str, np.ndarray]], rows: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Concatenate consecutive batches (dicts of arrays with a leading batch axis) into chunks of ~``rows`` rows."""
    rows = rows or CHUNK_ROWS
    pending: list[dict[str, np.ndarray]] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += len(next(iter(batch.values())))
        if count >= rows:
            yield _concat(pending)
            pending, count = [], 0
    if pending:
        yield _concat(pending)


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = batches[0].keys()
    try:
        return {k: np.concatenate([b[k] for b in batches]) for k in keys}
    except ValueError as e:
        shapes = [{k: b[k].shape[1:] for k in keys} for b in batches]
        raise ValueError(f"rows of one cache must share their shapes; got {shapes}. Write one cache per shape.") from e


def features_of(chunk: dict[str, np.ndarray]):
    """``datasets.Features`` of a chunk: 1-D arrays become scalar columns, (N, C, H, W) arrays ``Array3D``."""
    import datasets

    features = {}
    for key, array in chunk.items():
        if array.ndim == 1:
            features[key] = datasets.Value(str(array.dtype))
        elif array.ndim == 2:  # e.g. pooled text embeddings (N, D)
            features[key] = datasets.Sequence(datasets.Value(str(array.dtype)), length=array.shape[1])
        elif array.ndim == 3:  # e.g. prompt embeddings (N, L, D)
            features[key] = datasets.Array2D(shape=tuple(array.shape[1:]), dtype=str(array.dtype))
        elif array.ndim == 4:
            features[key] = datasets.Array3D(shape=tuple(array.shape[1:]), dtype=str(array.dtype))
        else:
            raise ValueError(f"column {key!r} has shape {array.shape}; a cache stores (N,), (N, D), (N, L, D) or "
                             "(N, C, H, W) arrays.")
    return datasets.Features(features)


def write_cache(cache_dir: str, chunks: Iterable[dict[str, np.ndarray]], meta: dict) -> dict:
    """Write ``chunks`` (dicts of equally long arrays) as one dataset plus ``meta`` into ``cache_dir``, atomically.

    ``meta`` must be JSON-serializable; ``num_rows`` and ``shapes`` ({column: per-row shape}) are added to it.

    Returns:
        The meta dict as written.

    Raises:
        FileExistsError: ``cache_dir`` exists and is not an empty folder.
        ValueError: no rows, rows of different shapes, or meta that JSON cannot encode.
    """
    final = os.path.abspath(os.path.expanduser(cache_dir))
    if os.path.exists(final) and not (os.path.isdir(final) and not os.listdir(final)):
        raise FileExistsError(
            f"cache_dir={cache_dir!r} already exists and is not an empty folder; delete it or pick a new cache_dir."
        )
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=os.path.dirname(final))
    try:
        done = _write_parts(tmp, chunks, meta)
        _commit(done, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_meta(final)


def _write_parts(tmp: str, chunks: Iterable[dict[str, np.ndarray]], meta: dict) -> str:
    """Save each chunk as a part, merge the parts, write the meta last; returns the finished folder."""
    import datasets

    parts, features = [], None
    for i, chunk in enumerate(chunks):
        chunk_features = features_of(chunk)
        features = features if features is not None else chunk_features
        if chunk_features != features:
            raise ValueError(f"chunk {i} has features {chunk_features}, chunk 0 had {features}; shapes must agree.")
        parts.append(os.path.join(tmp, f"part-{i:05d}"))
        datasets.Dataset.from_dict(chunk, features=features).save_to_disk(parts[-1])
    if not parts:
        raise ValueError("no rows to write; the cache would be empty. Check the data source.")
    done = parts[0]
    if len(parts) > 1:
        done = os.path.join(tmp, "merged")
        datasets.concatenate_datasets([datasets.load_from_disk(p) for p in parts]).save_to_disk(done)
    shapes = {key: list(getattr(f, "shape", None) or ([f.length] if getattr(f, "length", -1) > 0 else []))
              for key, f in features.items()}
    num_rows = sum(datasets.load_from_disk(p).num_rows for p in parts)
    _write_meta(done, {**meta, "num_rows": num_rows, "shapes": shapes})
    return done


def _write_meta(folder: str, meta: dict) -> None:
    try:
        text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"cache meta must be JSON-serializable (str, int, float, bool, None, list, dict): {e}") from e
    with open(os.path.join(folder, META_FILE), "w") as f:
        f.write(text)


def _commit(done: str, final: str) -> None:
    """Rename ``done`` to ``final``; if another process finished the same cache first, keep theirs."""
    if os.path.isdir(final) and not os.listdir(final):
        os.rmdir(final)
    try:
        os.rename(done, final)
    except OSError:
        if not is_cache(final):
            raise
