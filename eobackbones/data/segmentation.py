"""The embedded segmentation smoke set (``seg_mini.npz``): 9 PASTIS-R patches and one reBEN reference map.

Real Sentinel-2 / Sentinel-1 pixels with real per-pixel labels, tiny: a smoke test for segmentation probes,
heads and fine-tuning, **not a benchmark**. Provenance, licences (PASTIS-R CC-BY-4.0, BigEarthNet
CDLA-Permissive-1.0), attribution and caveats: ``SEG_MINI.md`` next to this file.

Every loader returns a :class:`~eobackbones.data.ProbeData` with per-pixel ``masks`` (N, H, W) int64, the
``ignore_index`` those masks use for unlabelled pixels, class names (``label_names``), images per modality
(N, C, H, W) float32 with band names and units, and the official split.
"""
from __future__ import annotations

from importlib import resources
from typing import Sequence, Union

import numpy as np

from .datasets import ProbeData, segmentation_data

__all__ = ["load_pastis_mini", "load_ben_refmap", "PASTIS_GROUPS3", "IGNORE_INDEX"]

IGNORE_INDEX = 255
_FILE = "seg_mini.npz"
_PASTIS_VOID = 19
# the 3-group task: background (0), meadow (1), and every crop class (2..18) -> crop; void ignored
PASTIS_GROUPS3 = ("Background", "Meadow", "Crop")
_UNITS = {"s2": "reflectance_1e4", "s1": "dB", "s1_asc": "dB", "s1_desc": "dB"}


def _open():
    ref = resources.files("eobackbones.data").joinpath(_FILE)
    return resources.as_file(ref)


def _pick_dates(series: np.ndarray, date: Union[str, int], blue: np.ndarray | None) -> tuple[np.ndarray, list]:
    """(N, T, C, H, W) -> (N, C, H, W) float32 by the date policy; also the per-sample date index (or policy)."""
    n, t = series.shape[:2]
    x = series.astype(np.float32)
    if date == "median":
        return np.median(x, axis=1), ["median"] * n
    if date == "clearest":
        if blue is None:
            # radar sees through clouds: no "clearest" date, use the median
            return np.median(x, axis=1), ["median"] * n
        idx = blue.reshape(n, t, -1).mean(-1).argmin(1)
        return x[np.arange(n), idx], [int(i) for i in idx]
    if isinstance(date, (int, np.integer)) and not isinstance(date, bool) and -t <= date < t:
        return x[:, date], [int(date) % t] * n
    raise ValueError(f"date must be 'median', 'clearest' or a date index in [0, {t}), got {date!r}")


def load_pastis_mini(
        modalities: Sequence[str] = ("s2",),
        date: Union[str, int] = "median",
        task: str = "groups3",
        s1_orbit: str = "asc",
) -> ProbeData:
    """Load the 9 PASTIS-R patches (32 x 32 px at about 40 m, France, autumn 2018; labels: 2019 crop types).

    Args:
        modalities: any of ``"s2"`` (L2A reflectance x 1e4, bands B02, B03, B04, B05, B06, B07, B08, B8A, B11,
            B12: no B01 / B09 / B10), ``"s1"`` (VV, VH in dB, the orbit of ``s1_orbit``), ``"s1_asc"``,
            ``"s1_desc"``.
        date: how a single-date image is made from the 3 acquisitions of each series: ``"median"`` (default:
            per-pixel, per-band median over the 3 dates, which removes a cloud or haze on one date: the first
            S2 date is cloudy on several patches), ``"clearest"`` (per patch, the S2 date with the darkest
            mean B02; S1 then uses the median) or a date index 0..2 (same index for every modality).
        task: ``"groups3"`` (background / meadow / crop: every crop class 2..18 is "crop") or ``"classes"``
            (the 19 PASTIS classes 0..18). The void label (19) is ``ignore_index`` (255) in both.
        s1_orbit: orbit of the ``"s1"`` modality: ``"asc"`` or ``"desc"``.

    Returns:
        9 samples, split as GEO-Bench-2 maps the official PASTIS folds: train 5, val 2, test 2.
    """
    allowed = ("s2", "s1", "s1_asc", "s1_desc")
    if not modalities or isinstance(modalities, str) or set(modalities) - set(allowed):
        raise ValueError(f"modalities must be a non-empty sequence of {allowed}, got {modalities!r}")
    if task not in ("groups3", "classes"):
        raise ValueError(f"task must be 'groups3' or 'classes', got {task!r}")
    if s1_orbit not in ("asc", "desc"):
        raise ValueError(f"s1_orbit must be 'asc' or 'desc', got {s1_orbit!r}")
    with _open() as path, np.load(path, allow_pickle=False) as z:
        s2_bands = tuple(str(b) for b in z["pastis_s2_bands"])
        s1_bands = tuple(str(b) for b in z["pastis_s1_bands"])
        blue = z["pastis_s2"][:, :, s2_bands.index("B02")].astype(np.float32)
        images, bands, dates = {}, {}, {}
        for m in modalities:
            key = "s2" if m == "s2" else f"s1_{s1_orbit}" if m == "s1" else m
            images[m], picked = _pick_dates(z[f"pastis_{key}"], date, blue if m == "s2" else None)
            bands[m] = s2_bands if m == "s2" else s1_bands
            all_dates = z[f"pastis_{key}_dates"]
            dates[m] = [str(int(all_dates[i, p])) if isinstance(p, int) else p for i, p in enumerate(picked)]
        label = z["pastis_label"].astype(np.int64)
        class_names = tuple(str(c) for c in z["pastis_class_names"])
        void = label == _PASTIS_VOID
        if task == "groups3":
            masks = np.where(label == 0, 0, np.where(label == 1, 1, 2))
            names = PASTIS_GROUPS3
        else:
            masks = label.copy()
            names = class_names[:_PASTIS_VOID]
        masks[void] = IGNORE_INDEX
        split = np.where(z["pastis_split"] == "validation", "val", z["pastis_split"]).astype(str)
        return segmentation_data(
            masks, IGNORE_INDEX, names,
            name=f"pastis_mini_{task}",
            images=images,
            bands=bands,
            units={m: _UNITS[m] for m in modalities},
            split=split,
            groups=z["pastis_tile"].astype(str),
            ids=z["pastis_patch_id"],
            meta=dict(
                task=task, date_policy=date, dates=dates, s1_orbit=s1_orbit, gsd_m=40.0,
                lon=z["pastis_lon"], lat=z["pastis_lat"], source_class_names=class_names,
                note="smoke test, not a benchmark: 9 patches, resized 128 -> 32 px, autumn-2018 images for "
                     "2019 crop labels (see SEG_MINI.md)"),
        )


def load_ben_refmap(modalities: Sequence[str] = ("s2",), labels: str = "ben19") -> ProbeData:
    """Load the one BigEarthNet v2 patch with its per-pixel CORINE reference map (120 x 120 px at 10 m, Austria).

    The same patch as BigEarthNet-mini index 0 (official split: test).

    Args:
        modalities: any of ``"s2"`` (L2A reflectance x 1e4, B01..B12 without B10; 20 / 60 m bands upsampled)
            and ``"s1"`` (VH, VV in dB).
        labels: ``"ben19"`` (BigEarthNet-19 classes; 255 where a CORINE class has no counterpart, none here)
            or ``"clc"`` (the 44 CORINE Land Cover level-3 classes, index into ``clc_codes``).
    """
    if not modalities or isinstance(modalities, str) or set(modalities) - {"s1", "s2"}:
        raise ValueError(f"modalities must be a non-empty sequence of ('s2', 's1'), got {modalities!r}")
    if labels not in ("ben19", "clc"):
        raise ValueError(f"labels must be 'ben19' or 'clc', got {labels!r}")
    with _open() as path, np.load(path, allow_pickle=False) as z:
        images = {m: z[f"ben_{m}"].astype(np.float32) for m in modalities}
        bands = {m: tuple(str(b) for b in z[f"ben_{m}_bands"]) for m in modalities}
        codes = z["ben_clc_codes"]
        if labels == "ben19":
            masks = z["ben_ben19_map"].astype(np.int64)
            names = tuple(str(s) for s in z["ben_ben19_names"])
        else:
            clc = z["ben_clc_map"].astype(np.int64)
            lut = {int(c): i for i, c in enumerate(codes)}
            masks = np.vectorize(lambda c: lut.get(int(c), IGNORE_INDEX))(clc).astype(np.int64)
            names = tuple(str(s) for s in z["ben_clc_names"])
        return segmentation_data(
            masks, IGNORE_INDEX, names,
            name=f"ben_refmap_{labels}",
            images=images,
            bands=bands,
            units={m: _UNITS[m] for m in modalities},
            split=np.array(["test"]),
            groups=np.array(["33UUP"]),
            ids=z["ben_patch_id"].astype(str),
            meta=dict(labels=labels, clc_codes=codes, clc_to_ben19=z["ben_clc_to_ben19"], crs=str(z["ben_crs"][0]),
                      geotransform=z["ben_geotransform"][0], gsd_m=10.0,
                      bigearthnet_mini_idx=int(z["ben_bigearthnet_mini_idx"][0]),
                      note="one patch: a smoke test, not a benchmark (see SEG_MINI.md)"),
        )
