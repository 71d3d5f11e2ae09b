"""The RGB-D data layer: one example schema, TFRecord/ArrayRecord shards, converters for NYU Depth V2,
SUN RGB-D, ScanNet, TUM RGB-D and folders, a procedural scene generator, and the grain pipeline.

The trainer needs only:
  default_data_config() / data_options(**changes) / validate_data_config(cfg)
  pipeline_from_config(cfg, batch_size=..., image_size=..., seed=..., train=...)
  make_pipeline(paths, cfg, batch_size=..., image_size=..., seed=..., train=...)
  write_procedural_dataset(out_dir, num_frames, image_size, seed, num_shards, format)
"""

from mmcmae_jax.data.config import data_options, default_data_config, pipeline_from_config, validate_data_config
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.data.pipeline import CheckedTFRecordIterDataset, SkipLog, make_pipeline
from mmcmae_jax.data.procedural import (
    CLASS_NAMES as PROCEDURAL_CLASS_NAMES,
    ensure_procedural_dataset,
    render_frame,
    write_procedural_dataset,
)
from mmcmae_jax.data.records import ARRAY_RECORD, TFRECORD, expand_paths, read_records, write_records
from mmcmae_jax.data.schema import (
    IGNORE_LABEL,
    DecodedFrame,
    RGBDExample,
    decode_example,
    example_from_arrays,
    parse_example,
    serialize_example,
)

__all__ = [
    "ARRAY_RECORD",
    "TFRECORD",
    "IGNORE_LABEL",
    "PROCEDURAL_CLASS_NAMES",
    "CheckedTFRecordIterDataset",
    "DecodedFrame",
    "RGBDExample",
    "RecordError",
    "SkipLog",
    "data_options",
    "decode_example",
    "default_data_config",
    "ensure_procedural_dataset",
    "example_from_arrays",
    "expand_paths",
    "make_pipeline",
    "parse_example",
    "pipeline_from_config",
    "read_records",
    "render_frame",
    "serialize_example",
    "validate_data_config",
    "write_procedural_dataset",
    "write_records",
]
