"""Build the embedded ``bigearthnet_mini.npz`` from the shared BigEarthNet-mini source.

Not run at test time. Usage::

    python -m eobackbones.data.build_bigearthnet_mini \
        /path/to/ben_s1s2.npz /path/to/index.csv eobackbones/data/bigearthnet_mini.npz

Derivation (see ``README.md`` next to this file): all 102 patches, centre crop of
``CROP`` x ``CROP`` pixels from the 120 x 120 (10 m) grid, S2 kept as uint16 (reflectance x 1e4,
lossless), S1 cast to float16 dB (NaN kept for patches whose S1 copy was corrupt), metadata
from ``index.csv``. The zip container is written with fixed timestamps so the sha256 is
reproducible.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import re
import zipfile
from pathlib import Path

import numpy as np

CROP = 48  # 64 x 64 does not fit the 6 MB budget with plain zlib-compressed arrays (~8.2 MB)
SOURCE_SIZE = 120
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S1_BANDS = ("VH", "VV")
_TILE_RE = re.compile(r"_T(\d{2}[A-Z]{3})_")


def _tile(patch_id: str) -> str:
    """MGRS tile of a BigEarthNet v2 patch id (``""`` when the id carries none)."""
    m = _TILE_RE.search(patch_id)
    return m.group(1) if m else ""


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` equivalent with fixed zip timestamps (reproducible bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def build(src_npz: Path, index_csv: Path, out: Path, crop: int = CROP) -> dict[str, np.ndarray]:
    """Derive the compact embedded file and return the arrays written.

    Args:
        src_npz: Path of the source ``ben_s1s2.npz``.
        index_csv: Path of the source ``index.csv``.
        out: Output ``.npz`` path.
        crop: Side of the centre crop in pixels.
    """
    src = np.load(src_npz, allow_pickle=False)
    with open(index_csv, newline="") as f:
        rows = list(csv.DictReader(f))

    patch_id = src["patch_id"]
    label_names = tuple(str(s) for s in src["label_names"])
    if len(rows) != len(patch_id) or any(r["ben_v2_patch_id"] != p for r, p in zip(rows, patch_id)):
        raise ValueError("index.csv rows do not match the npz patch order")
    if tuple(src["s2_bands"]) != S2_BANDS or tuple(src["s1_bands"]) != S1_BANDS:
        raise ValueError(f"unexpected band order: {src['s2_bands']} / {src['s1_bands']}")

    # The csv labels are the audited ones; refuse to build if the npz multi-hot disagrees.
    labels = src["labels19"].astype(np.uint8)
    for r, row_labels in zip(rows, labels):
        names = {label_names[i] for i in np.flatnonzero(row_labels)}
        if names != set(filter(None, r["labels19"].split(";"))):
            raise ValueError(f"label mismatch for {r['ben_v2_patch_id']}")

    s1_valid = np.array([r["s1_valid"] == "True" for r in rows])
    s1_nan = np.isnan(src["s1"]).reshape(len(rows), -1)
    if not (np.array_equal(s1_nan.all(1), ~s1_valid) and np.array_equal(s1_nan.any(1), ~s1_valid)):
        raise ValueError("s1_valid does not match the NaN patches of s1")

    o = (SOURCE_SIZE - crop) // 2
    win = (slice(None), slice(None), slice(o, o + crop), slice(o, o + crop))
    arrays = {
        "s2": src["s2"][win].astype(np.uint16),
        "s2_bands": np.array(S2_BANDS),
        "s1": src["s1"][win].astype(np.float16),
        "s1_bands": np.array(S1_BANDS),
        "s1_valid": s1_valid,
        "labels19": labels,
        "label_names": np.array(label_names),
        "patch_id": np.array([str(p) for p in patch_id]),
        # BigEarthNet v2 official split; the one v1-only patch has none.
        "split": np.array([r["official_split"] or "none" for r in rows]),
        "tile": np.array([_tile(str(p)) for p in patch_id]),
        "country": np.array([r["country"] for r in rows]),
        "crop_window": np.array([o, o, crop, crop], dtype=np.int16),  # row0, col0, h, w on 120 grid
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_npz(out, arrays)
    return arrays


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src_npz", type=Path)
    p.add_argument("index_csv", type=Path)
    p.add_argument("out", type=Path, nargs="?",
                   default=Path(__file__).with_name("bigearthnet_mini.npz"))
    p.add_argument("--crop", type=int, default=CROP)
    args = p.parse_args()
    arrays = build(args.src_npz, args.index_csv, args.out, args.crop)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) sha256={digest}")
    names = arrays["label_names"]
    for split in ("train", "validation", "test", "none"):
        m = arrays["split"] == split
        counts = arrays["labels19"][m].sum(0)
        print(f"{split}: n={m.sum()} s1_invalid={(~arrays['s1_valid'][m]).sum()} "
              + ", ".join(f"{n}={c}" for n, c in zip(names, counts) if c))


if __name__ == "__main__":
    main()
