"""The converter's sources: one module each, registered in sources.SOURCES, which `convert` reads."""

import numpy as np
import pytest

from mmcmae_jax.data import convert, depth_units, records, schema, sources
from mmcmae_jax.data.sources.source import Source

# A full command line of every subcommand as docs/data.md and docs/datasets.md give them.
COMMAND_LINES = {
    "folder": ["--root", "R", "--rgb", "rgb/*.png", "--depth", "d/*.png", "--depth-scale", "0.001",
               "--depth-encoding", "sunrgbd", "--label", "l/*.png", "--label-set", "nyu40", "--labels-one-based",
               "--intrinsics", "1,2,3,4", "--source", "nyu_depth_v2"],
    "nyu-mat": ["--mat", "m.mat", "--split", "test", "--splits", "s.mat", "--label-map", "classMapping40.mat",
                "--nyu40-to-13", "class13Mapping.mat", "--label-set", "nyu13"],
    "sunrgbd": ["--root", "R", "--split", "test", "--raw-depth"],
    "scannet": ["--root", "R", "--label-map", "t.tsv", "--label-column", "nyu40id", "--label-set", "nyu40"],
    "tum": ["--root", "R", "--max-difference", "0.05", "--intrinsics", "1,2,3,4"],
    "procedural": ["--num-frames", "4", "--size", "32", "--seed", "1", "--depth-noise", "--style", "varied",
                   "--workers", "2"],
}
SHARED = ["--out", "O", "--overwrite", "--prefix", "p", "--num-shards", "3", "--format", "tfrecord", "--skip-bad"]


def test_every_source_keeps_its_command_line():
    assert list(sources.SOURCES) == list(COMMAND_LINES)
    parser = convert.build_parser()
    for name, own in COMMAND_LINES.items():
        reads_frames = sources.SOURCES[name].frames is not None
        depth_range = ["--plausible-depth", "0.2,10,50"] if reads_frames else []
        args = parser.parse_args([name, *SHARED, *own, *depth_range])
        shared = (args.command, args.out, args.overwrite, args.prefix, args.num_shards, args.format, args.skip_bad)
        assert shared == (name, "O", True, "p", 3, "tfrecord", True)
        if reads_frames:
            assert args.plausible_depth == depth_units.PlausibleDepth(0.2, 10, 50)
        else:
            with pytest.raises(SystemExit):
                parser.parse_args([name, *SHARED, *own, "--plausible-depth", "0.2,10,50"])
    assert parser.parse_args(["folder", *SHARED, *COMMAND_LINES["folder"]]).intrinsics == (1, 2, 3, 4)
    assert parser.parse_args(["tum", "--out", "O", "--root", "R"]).max_difference == 0.02
    assert parser.parse_args(["nyu-mat", "--out", "O", "--mat", "m"]).prefix == "nyu_mat"


def test_a_new_source_is_its_module_and_one_table_entry(tmp_path, monkeypatch):
    """Registering a Source is all `convert` needs: its arguments, its frames, the shared options."""

    def add_arguments(p):
        p.add_argument("--metres", type=float, required=True)

    def frames(args, skip_log):
        units = depth_units.metres_to_units(np.full((8, 8), args.metres), 0.001)
        return [schema.example_from_arrays(np.zeros((8, 8, 3), np.uint8), units, 0.001, frame_id=str(i),
                                           source="flat") for i in range(3)]

    monkeypatch.setitem(sources.SOURCES, "flat", Source("flat", "a flat wall", add_arguments, frames, "out"))
    out = tmp_path / "out"
    assert convert.main(["flat", "--metres", "2.5", "--out", str(out), "--num-shards", "2"]) == 0
    paths = records.expand_paths(str(out))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["flat-00000-of-00002.array_record",
                                                     "flat-00001-of-00002.array_record"]
    decoded = [schema.decode_example(schema.parse_example(r)) for p in paths for r in records.read_records(p)]
    assert len(decoded) == 3 and all(np.allclose(d.depth_m, 2.5) for d in decoded)


def test_a_source_either_reads_frames_or_writes_its_shards():
    with pytest.raises(TypeError, match="exactly one of frames and write"):
        Source("both", "", lambda p: None, frames=lambda a, s: [], write=lambda a: [])
    with pytest.raises(TypeError, match="exactly one of frames and write"):
        Source("neither", "", lambda p: None)
