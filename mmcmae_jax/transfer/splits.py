"""Label-fraction splits for the data-efficient study: a deterministic subset of the training frames.

Every frame gets a rank from a hash of (seed, source, frame id); a fraction f keeps the
ceil(f * N) lowest-ranked frames. So the choice does not depend on shard layout, file order or the
machine, and every smaller fraction is a subset of every larger one (10% within 20% within 40% ...),
which keeps the curve of a data-efficient study free of resampling noise.

The chosen records are copied, unchanged, into shards of the same format in a subset directory with a
`subset.json` manifest, and the ordinary pipeline reads them; a matching manifest is reused.

A frame is labelled when its record holds a label map (`is_labelled`); segmentation chooses among those,
and refuses at start a training or evaluation set without one (`require_labelled_frames`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os

from mmcmae_jax.config import ConfigError
from mmcmae_jax.data import records, schema
from mmcmae_jax.data.errors import RecordError

MANIFEST = "subset.json"


def is_labelled(ex: schema.RGBDExample) -> bool:
    """Whether a frame can teach segmentation: its record holds a label map."""
    return ex.label is not None


def parsed_records(paths, fmt: str | None = None, skip_bad_records: bool = False):
    """(record bytes, parsed example) of every record of `paths`, in order; images are not decoded.
    fmt None: each file's format from its name. skip_bad_records: pass over records that do not parse,
    and over the rest of a file that cannot be read on (as the pipeline skips them)."""
    for path in paths:
        try:
            for index, data in enumerate(records.read_records(path, fmt)):
                try:
                    ex = schema.parse_example(data, path=path, record=index)
                except RecordError:
                    if not skip_bad_records:
                        raise
                    continue
                yield data, ex
        except RecordError:
            if not skip_bad_records:
                raise


def has_labelled_frame(paths_or_pattern, fmt: str | None = None, skip_bad_records: bool = False) -> bool:
    """Whether any record of `paths_or_pattern` holds a label map.

    It stops at the first labelled record: one record on a labelled set. Only a set with no label
    map at all is read to its end, parsing each record but decoding no image (about the cost of one
    of the two passes `write_label_fraction` makes); that is the set a segmentation run would
    otherwise train on for all its steps with a loss of 0."""
    paths = records.expand_paths(paths_or_pattern)
    return any(is_labelled(ex) for _, ex in parsed_records(paths, fmt, skip_bad_records))


def require_labelled_frames(config, field: str = "data"):
    """For segmentation, raise ConfigError naming config.<field>.path when its records hold no label
    map: every pixel would be ignored, so training would learn nothing (loss 0) and evaluation would
    measure nothing. The procedural set (empty path) is labelled throughout."""
    data = config[field]
    if config.task != "segmentation" or not data.path:
        return
    fmt = None if data.format == "auto" else data.format
    try:
        labelled = has_labelled_frame(data.path, fmt, data.skip_bad_records)
    except FileNotFoundError as err:  # as the pipeline would say it: name the field that gave the path
        raise ConfigError(f"config.{field}.path={data.path!r}: {err}") from None
    if not labelled:
        raise ConfigError(f"config.{field}.path={data.path!r}: no record there holds a label map, and "
                          f"segmentation learns and is measured on labelled pixels only; give records "
                          f"converted with their labels (docs/data.md)")


def frame_rank(seed: int, source: str, frame_id: str) -> int:
    """A 64-bit rank, uniform over frames, fixed by (seed, source, frame id)."""
    digest = hashlib.sha256(f"{seed}\0{source}\0{frame_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def choose_frames(keys, fraction: float, seed: int) -> set:
    """The (source, frame_id) keys kept at `fraction` (at least one)."""
    keys = list(keys)
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if len(set(keys)) != len(keys):
        duplicated = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise ValueError(f"frame ids are not unique within their source, e.g. {duplicated}: a fraction "
                         "of frames cannot be chosen by id")
    count = max(1, math.ceil(fraction * len(keys)))
    return set(sorted(keys, key=lambda k: frame_rank(seed, *k))[:count])


def write_label_fraction(paths_or_pattern, out_dir: str, fraction: float, seed: int = 0,
                         labelled_only: bool = False, num_shards: int = 1) -> dict:
    """Copy the chosen fraction of the records in `paths_or_pattern` into `out_dir`.

    labelled_only: frames without a label map are not candidates (segmentation), so the fraction is
    one of the labelled frames. Returns the manifest: fraction, seed, counts, the chosen frame ids and
    the shard paths. A manifest already in `out_dir` for the same inputs and choice is returned as is.
    """
    paths = records.expand_paths(paths_or_pattern)
    fmt = records.detect_format(paths[0])
    labelled = is_labelled if labelled_only else (lambda ex: True)
    request = {"inputs": [os.path.abspath(p) for p in paths], "fraction": fraction, "seed": seed,
               "labelled_only": labelled_only}
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        if {k: manifest.get(k) for k in request} == request and all(os.path.exists(p) for p in manifest["shards"]):
            return manifest

    keys = [(ex.source, ex.frame_id) for _, ex in parsed_records(paths, fmt) if labelled(ex)]
    candidates = len(keys)
    if not keys:
        raise ValueError(f"no {'labelled ' if labelled_only else ''}frames in {paths_or_pattern!r} to choose from")
    chosen = choose_frames(keys, fraction, seed)

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(manifest_path):  # an earlier, different choice: it describes shards about to go
        os.remove(manifest_path)
    # The folder is this function's own: an earlier choice's shards are replaced, and a failure part-way
    # leaves no readable subset behind (the shards appear only once all are written).
    written = 0
    with records.ShardSetWriter(out_dir, "subset", num_shards, fmt, overwrite=True) as shard_set:
        writers = [records.open_writer(p, fmt) for p in shard_set.temporary_paths]
        try:
            for data, ex in parsed_records(paths, fmt):
                if (ex.source, ex.frame_id) in chosen and labelled(ex):
                    writers[written % num_shards].write(data)
                    written += 1
        finally:
            for writer in writers:
                writer.close()
    manifest = dict(request, candidates=candidates, chosen=written, shards=shard_set.paths,
                    frames=sorted(f"{s}/{i}" for s, i in chosen))
    partial = manifest_path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(partial, manifest_path)
    return manifest
