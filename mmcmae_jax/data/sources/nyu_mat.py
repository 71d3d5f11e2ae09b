"""`convert nyu-mat`: NYU Depth V2's labelled frames, all of them or one split of the standard split,
with labels in the 40 or the 13 classes of the standard class mappings.

It reads the files as users download them with the dataset:
- nyu_depth_v2_labeled.mat (MATLAB v7.3, i.e. HDF5; h5py): `images` (N,3,W,H) uint8, `depths` (N,W,H)
  float metres, `labels` (N,W,H) with 894 classes, 0 = unlabelled; MATLAB stores arrays transposed.
- splits.mat (MATLAB v5; scipy.io): `trainNdxs` (795x1) and `testNdxs` (654x1), the 1-based numbers
  of the frames of the standard split (Silberman et al., ECCV 2012) in the labelled .mat.
- classMapping40.mat (v5): `mapClass` (1x894), the class 1..40 of each of the 894 classes in the 40
  classes of Gupta et al. (CVPR 2013), nyu40.
- class13Mapping.mat (v5): a struct `classMapping13` whose `labels13` (1x40) is the class 1..13 of each
  nyu40 class in the 13 classes of Couprie et al. (2013) and Eigen & Fergus (2015), nyu13.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from mmcmae_jax.data import depth_units, schema
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.data.sources.images import one_based_labels
from mmcmae_jax.data.sources.source import Frames, Source, guarded

# NYU Depth V2 RGB camera (the dataset toolbox's camera_params.m).
NYU_INTRINSICS = (518.8579, 519.4696, 325.5824, 253.7362)
# Classes of the labelled .mat's `labels`, and of the 40-class set the 13 classes are defined on.
NYU_CLASSES = 894
NYU40_CLASSES = 40
# splits.mat's variable of each split.
SPLIT_VARIABLES = {"train": "trainNdxs", "test": "testNdxs"}


def _read_mat_v5(path: str) -> dict:
    """The variables of a MATLAB v5 file (structs as dicts, arrays squeezed); a missing or unreadable
    file raises RecordError naming it."""
    import scipy.io

    if not os.path.exists(path):
        raise RecordError(path, "file does not exist")
    try:
        variables = scipy.io.loadmat(path, simplify_cells=True)
    except Exception as e:  # scipy raises several types: not a .mat, truncated, v7.3 (HDF5) ...
        raise RecordError(path, f"cannot read as a MATLAB v5 .mat file ({type(e).__name__}: {e})") from None
    return {k: v for k, v in variables.items() if not k.startswith("__")}


def _mapping_in_mat(path: str):
    variables = _read_mat_v5(path)
    if "mapClass" in variables:  # classMapping40.mat, and 894 -> 13 files in its layout
        return variables["mapClass"]
    struct = variables.get("classMapping13")
    if isinstance(struct, dict) and "labels13" in struct:  # class13Mapping.mat
        return struct["labels13"]
    raise RecordError(
        path,
        f"holds no class mapping: expected mapClass (as classMapping40.mat) or classMapping13.labels13 "
        f"(as class13Mapping.mat), found {sorted(variables)}",
    )


def load_label_map(path: str, num_classes: int, hint: str = "") -> np.ndarray:
    """A class mapping as a lookup table: entry k is the 1-based target of source class k (k =
    1..num_classes), entry 0 (unlabelled) stays 0.

    path: a .mat in the layout of classMapping40.mat or class13Mapping.mat, or a .json / .npy / .txt
    array of num_classes targets. A file of another length raises RecordError (with hint appended), as
    do targets that are not whole numbers 0..254 (0 = unlabelled; a class index must not become 255).
    """
    if not os.path.exists(path):
        raise RecordError(path, "label mapping file does not exist")
    if path.endswith(".mat"):
        table = _mapping_in_mat(path)
    else:
        try:
            if path.endswith(".npy"):
                table = np.load(path)
            elif path.endswith(".json"):
                with open(path) as f:
                    table = json.load(f)
            else:
                table = np.loadtxt(path)
        except (OSError, ValueError) as e:
            raise RecordError(path, f"cannot read a class mapping ({type(e).__name__}: {e})") from None
    try:
        table = np.asarray(table, np.float64).ravel()
    except (TypeError, ValueError):
        raise RecordError(path, "a class mapping is an array of class numbers") from None
    if table.size != num_classes:
        raise RecordError(path, f"maps {table.size} classes, not {num_classes}{hint}")
    if not (np.all(table == np.round(table)) and table.min() >= 0 and table.max() <= 254):
        raise RecordError(path, "targets must be whole numbers 0..254 (1-based classes, 0 = unlabelled)")
    return np.concatenate([[0], table.astype(np.int64)])


def load_split(path: str, split: str) -> np.ndarray:
    """The 1-based frame numbers of `split` ("train" or "test") in a splits.mat."""
    if split not in SPLIT_VARIABLES:
        raise ValueError(f"split must be one of {sorted(SPLIT_VARIABLES)}, got {split!r}")
    variables = _read_mat_v5(path)
    name = SPLIT_VARIABLES[split]
    if name not in variables:
        raise RecordError(
            path, f"no variable {name} (the {split} frames) as in NYU's splits.mat; found {sorted(variables)}"
        )
    numbers = np.atleast_1d(np.asarray(variables[name])).ravel()  # a one-frame split is squeezed to a scalar
    if not (numbers.size and np.issubdtype(numbers.dtype, np.number) and np.all(numbers == np.round(numbers))
            and numbers.min() >= 1):
        raise RecordError(path, f"{name} must hold frame numbers 1, 2, ... (1-based)")
    numbers = numbers.astype(np.int64)
    if len(np.unique(numbers)) != len(numbers):
        raise RecordError(path, f"{name} lists a frame twice")
    return numbers


def _label_table(label_map: str | None, nyu40_to_13: str | None) -> np.ndarray | None:
    """The stored 1-based class (0 = unlabelled) of each of NYU's classes 0..894, or None without a
    mapping: label_map's, then nyu40_to_13's if given."""
    if nyu40_to_13 is not None and label_map is None:
        raise RecordError(
            nyu40_to_13, "maps the 40 classes to 13: it needs --label-map classMapping40.mat (894 -> 40) before it"
        )
    if label_map is None:
        return None
    lut = load_label_map(
        label_map,
        NYU_CLASSES,
        " (NYU's labelled classes, e.g. classMapping40.mat; a mapping of the 40 classes to 13, "
        "class13Mapping.mat, goes with --nyu40-to-13)",
    )
    if nyu40_to_13 is None:
        return lut
    to_13 = load_label_map(nyu40_to_13, NYU40_CLASSES, " (the 40 classes, as class13Mapping.mat)")
    if lut.max() > NYU40_CLASSES:
        raise RecordError(label_map, f"maps to class {lut.max()}; --nyu40-to-13 maps the classes 1..40")
    return to_13[lut]


def examples(
    mat_path: str,
    *,
    split: str | None = None,
    splits_path: str | None = None,
    label_map: str | None = None,
    nyu40_to_13: str | None = None,
    label_set: str | None = None,
    depth_limits: depth_units.PlausibleDepth = depth_units.PlausibleDepth(),
    skip_log=None,
) -> Frames:
    """The labelled frames of nyu_depth_v2_labeled.mat, frame n (1-based) with frame id n as '0001'.

    split: None for every frame, else "train" or "test": the frames splits.mat lists for it, in its order
      (splits_path; default: splits.mat beside the .mat).
    label_map: NYU's 894 classes -> K (classMapping40.mat: nyu40); without it no label is stored.
    nyu40_to_13: then the 40 classes -> 13 (class13Mapping.mat).
    label_set: the stored class set's name; default nyu13 with nyu40_to_13, else nyu40.
    """
    import h5py

    if not os.path.exists(mat_path):
        raise RecordError(mat_path, "file does not exist")
    numbers = None
    if split is not None:
        splits_path = splits_path or os.path.join(os.path.dirname(mat_path), "splits.mat")
        numbers = load_split(splits_path, split)
    lut = _label_table(label_map, nyu40_to_13)
    if label_set is None:
        label_set = "nyu13" if nyu40_to_13 is not None else "nyu40"
    if lut is None:
        logging.info("%s: no --label-map given, labels are not stored", mat_path)
    scale = depth_units.SOURCE_SCALES["nyu_mat"]
    with h5py.File(mat_path, "r") as f:
        for name in ("images", "depths") + (("labels",) if lut is not None else ()):
            if name not in f:
                raise RecordError(mat_path, f"no dataset {name!r}: not the NYU labeled .mat layout")
        n = f["images"].shape[0]
    if numbers is not None and numbers.max() > n:
        raise RecordError(
            splits_path, f"{SPLIT_VARIABLES[split]} lists frame {numbers.max()}; {mat_path} has {n} frames"
        )
    opened = {}  # process id -> the open .mat: each converting process opens its own

    def one(i):
        f = opened.get(os.getpid())
        if f is None:
            f = opened[os.getpid()] = h5py.File(mat_path, "r")
        rgb = np.ascontiguousarray(f["images"][i].transpose(2, 1, 0)).astype(np.uint8)
        depth = np.asarray(f["depths"][i]).T
        if depth.shape != rgb.shape[:2]:
            raise RecordError(
                mat_path, f"depth size {depth.shape} differs from rgb size {rgb.shape[:2]}", record=i
            )
        label = None
        if lut is not None:
            raw = np.asarray(f["labels"][i]).T.astype(np.int64)
            if raw.min() < 0 or raw.max() > NYU_CLASSES:
                raise RecordError(
                    mat_path, f"frame has class {raw.max()}; NYU's labelled set has {NYU_CLASSES}", record=i
                )
            label = one_based_labels(lut[raw])
        units = depth_units.metres_to_units(depth, scale)
        if not units.any():
            raise RecordError(mat_path, "frame has no valid depth", record=i)
        depth_units.check_plausible(units, scale, mat_path, depth_limits, record=i)
        return schema.example_from_arrays(
            rgb,
            units,
            scale,
            frame_id=f"{i + 1:04d}",
            source="nyu_depth_v2",
            label=label,
            label_set=label_set if label is not None else None,
            intrinsics=NYU_INTRINSICS,
        )

    return guarded(range(n) if numbers is None else (numbers - 1).tolist(), one, skip_log)


def _add_arguments(p):
    p.add_argument("--mat", required=True, help="nyu_depth_v2_labeled.mat")
    p.add_argument("--split", choices=sorted(SPLIT_VARIABLES),
                   help="only these frames of the standard split (795 train, 654 test frames)")
    p.add_argument("--splits", help="the dataset's splits.mat (trainNdxs, testNdxs); default: splits.mat "
                                    "beside --mat")
    p.add_argument("--label-map",
                   help="894 -> K class mapping: classMapping40.mat (to nyu40), or .json/.npy/.txt of 894 "
                        "1-based targets")
    p.add_argument("--nyu40-to-13", metavar="CLASS13_MAPPING",
                   help="then the 40 classes -> 13: class13Mapping.mat (or .json/.npy/.txt of 40 targets)")
    p.add_argument("--label-set", help="name of the mapped class set (default nyu40, nyu13 with --nyu40-to-13)")


def _frames(args, skip_log):
    if args.splits is not None and args.split is None:
        raise RecordError(args.splits, "--splits needs --split train or --split test")
    return examples(
        args.mat,
        split=args.split,
        splits_path=args.splits,
        label_map=args.label_map,
        nyu40_to_13=args.nyu40_to_13,
        label_set=args.label_set,
        depth_limits=args.plausible_depth,
        skip_log=skip_log,
    )


SOURCE = Source(
    name="nyu-mat",
    help="NYU Depth V2 labeled set (nyu_depth_v2_labeled.mat, v7.3; depth in metres): every frame, or the "
         "standard split's train or test frames",
    add_arguments=_add_arguments,
    frames=_frames,
    input_argument="mat",
)
