"""Build the embedded ``seg_mini.npz`` from the shared seg-mini source (PASTIS-R mini + one reBEN reference map).

Not run at test time. Usage::

    python -m eobackbones.data.build_seg_mini /path/to/seg-mini eobackbones/data/seg_mini.npz

Derivation (see ``SEG_MINI.md`` next to this file):

- ``pastis_*``: the 9 PASTIS-R patches as shipped in ``pastis_mini.npz``; S2 int16 unchanged; S1 ascending and
  descending keep VV and VH (the source's third channel is exactly VV - VH in dB, dropped) and are stored as
  float16, which is lossless here (the source stored them as float16); the ``instance`` map is dropped.
- ``ben_*``: the reBEN patch of ``ben_refmap_1.npz`` unchanged (S2 uint16, S1 float32 dB, CLC map, BEN-19
  map, lookup table, CRS and geotransform).

Checks: band lists and split values are the documented ones; the dropped S1 channel equals VV - VH; the
float16 cast is exact. The zip container has fixed timestamps, so the output bytes are reproducible.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from .build_bigearthnet_mini import _write_npz

PASTIS_S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
PASTIS_SPLITS = ("train", "validation", "test")


def build(src_dir: Path, out: Path) -> dict[str, np.ndarray]:
    """Derive the embedded file from ``src_dir`` (``pastis_mini.npz``, ``ben_refmap_1.npz``); returns the arrays."""
    p = np.load(src_dir / "pastis_mini.npz", allow_pickle=False)
    b = np.load(src_dir / "ben_refmap_1.npz", allow_pickle=False)
    if tuple(p["s2_bands"]) != PASTIS_S2_BANDS:
        raise ValueError(f"unexpected PASTIS S2 bands {p['s2_bands']}")
    if tuple(p["s1_bands"]) != ("VV", "VH", "VV-VH"):
        raise ValueError(f"unexpected PASTIS S1 bands {p['s1_bands']}")
    if set(p["split"]) - set(PASTIS_SPLITS):
        raise ValueError(f"unexpected PASTIS splits {set(p['split'])}")
    arrays: dict[str, np.ndarray] = {}
    for orbit in ("asc", "desc"):
        s1 = p[f"s1_{orbit}"]
        # the third channel is the VV - VH ratio in dB, recomputed in float16 upstream (up to 1 float16 ulp)
        if np.abs(s1[:, :, 2] - (s1[:, :, 0] - s1[:, :, 1])).max() > 0.02:
            raise ValueError(f"s1_{orbit}: third channel is not VV - VH")
        vv_vh = s1[:, :, :2]
        half = vv_vh.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), vv_vh):
            raise ValueError(f"s1_{orbit}: float16 cast is not exact")
        arrays[f"pastis_s1_{orbit}"] = half
        arrays[f"pastis_s1_{orbit}_dates"] = p[f"s1_{orbit}_dates"]
    arrays.update(
        pastis_s2=p["s2"], pastis_s2_dates=p["s2_dates"], pastis_label=p["label"],
        pastis_s2_bands=p["s2_bands"], pastis_s1_bands=np.array(["VV", "VH"]), pastis_class_names=p["class_names"],
        pastis_patch_id=p["patch_id"], pastis_split=p["split"], pastis_tile=p["tile"], pastis_lon=p["lon"],
        pastis_lat=p["lat"])
    for k in ("s2", "s1", "clc_map", "ben19_map", "s2_bands", "s1_bands", "ben19_names", "clc_codes", "clc_names",
              "clc_to_ben19", "patch_id", "bigearthnet_mini_idx", "crs", "geotransform"):
        arrays[f"ben_{k}"] = b[k]
    _write_npz(out, arrays)
    return arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src_dir", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    arrays = build(args.src_dir, args.out)
    sha = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, {len(arrays)} arrays), sha256 {sha}")


if __name__ == "__main__":
    main()
