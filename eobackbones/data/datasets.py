"""Tiny in-memory datasets for linear probing.

Every probe dataset is a :class:`ProbeData`: whole arrays in memory (probe sets are small),
bands named per modality so models can map inputs by band name rather than position.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

__all__ = [
    "ProbeData",
    "SPLITS",
    "segmentation_data",
    "load_bigearthnet_mini",
    "load_folder",
    "nan_policy",
    "subsample_labels",
]

SPLITS = ("train", "val", "test")
_BEN_FILE = "bigearthnet_mini.npz"


@dataclass
class ProbeData:
    """A labelled probe dataset held in memory.

    Attributes:
        name: Dataset name.
        images: Modality -> (N, C, H, W) float32 array.
        bands: Modality -> band names in channel order, e.g. ``{"s1": ("VH", "VV")}``.
        units: Modality -> unit, e.g. ``"reflectance_1e4"`` or ``"dB"``.
        labels: (N, K) multi-hot if ``multilabel`` else (N,) int class index.
        label_names: Class names, length K.
        multilabel: Whether ``labels`` is multi-hot.
        split: (N,) str array with values in ``("train", "val", "test")``.
        groups: Optional (N,) group ids (e.g. MGRS tile) for grouped cross-validation.
        ids: Optional (N,) sample ids (patch ids, relative file paths).
        meta: Free-form provenance / loading report.
        masks: Optional (N, H, W) int per-pixel classes over ``label_names`` (segmentation sets; ``labels`` then
            holds the per-image presence multi-hot).
        ignore_index: mask value excluded from losses and metrics.
        conditions: Optional non-image inputs per sample, name -> (N, k) raw values (e.g. a diffusion model's
            ``context``), normalised by the model's spec like images.
    """

    name: str
    images: dict[str, np.ndarray]
    bands: dict[str, tuple[str, ...]]
    units: dict[str, str]
    labels: np.ndarray
    label_names: tuple[str, ...]
    multilabel: bool
    split: np.ndarray
    groups: np.ndarray | None = None
    ids: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    masks: np.ndarray | None = None
    ignore_index: int | None = None
    conditions: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.masks is not None:
            if self.masks.ndim != 3 or len(self.masks) != n:
                raise ValueError(f"masks has shape {self.masks.shape}, expected ({n}, H, W)")
            labelled = self.masks[self.masks != self.ignore_index] if self.ignore_index is not None else self.masks
            if labelled.size and (labelled.min() < 0 or labelled.max() >= len(self.label_names)):
                raise ValueError(f"mask values must be in [0, {len(self.label_names)}) or {self.ignore_index}")
            for m, x in self.images.items():
                if x.shape[-2:] != self.masks.shape[-2:]:
                    raise ValueError(f"images[{m!r}] is {x.shape[-2:]} but masks are {self.masks.shape[-2:]}")
        for k, v in self.conditions.items():
            if v.ndim != 2 or len(v) != n:
                raise ValueError(f"conditions[{k!r}] has shape {v.shape}, expected ({n}, k)")
        for m, x in self.images.items():
            if x.ndim != 4 or len(x) != n:
                raise ValueError(f"images[{m!r}] has shape {x.shape}, expected ({n}, C, H, W)")
            if x.shape[1] != len(self.bands[m]):
                raise ValueError(f"images[{m!r}] has {x.shape[1]} channels but {len(self.bands[m])} band names")
        if len(self.split) != n or (self.groups is not None and len(self.groups) != n):
            raise ValueError("split/groups length does not match the number of samples")
        bad = set(np.unique(self.split)) - set(SPLITS)
        if bad:
            raise ValueError(f"unknown split values {sorted(bad)}; expected {SPLITS}")
        if self.multilabel != (self.labels.ndim == 2):
            raise ValueError(f"multilabel={self.multilabel} but labels have shape {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def task(self) -> str:
        return "segmentation" if self.masks is not None else "classification"

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.label_names

    def class_frequencies(self, split: str | None = None) -> np.ndarray:
        """Fraction of labelled pixels per class, in one split or overall (segmentation sets)."""
        if self.masks is None:
            raise ValueError(f"{self.name} has no per-pixel masks")
        m = self.masks if split is None else self.masks[self.split == split]
        if self.ignore_index is not None:
            m = m[m != self.ignore_index]
        return np.bincount(m.ravel(), minlength=self.num_classes) / max(1, m.size)

    def indices(self, split: str) -> np.ndarray:
        """Row indices of one split."""
        return np.flatnonzero(self.split == split)

    def subset(self, index: np.ndarray) -> ProbeData:
        """Rows selected by an index or boolean mask (a new object; arrays are copied)."""
        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return dataclasses.replace(
            self,
            images={m: x[index] for m, x in self.images.items()},
            labels=self.labels[index],
            split=self.split[index],
            groups=take(self.groups),
            ids=take(self.ids),
            meta=dict(self.meta),
            masks=take(self.masks),
            conditions={k: v[index] for k, v in self.conditions.items()},
        )

    def restrict_bands(self, modality: str, names: Sequence[str]) -> ProbeData:
        """The dataset with ``modality`` reduced to the bands ``names`` (by name, in that order)."""
        return dataclasses.replace(self, images=dict(self.images, **{modality: self.select_bands(modality, names)}),
                                   bands=dict(self.bands, **{modality: tuple(names)}))

    def select_bands(self, modality: str, names: Sequence[str]) -> np.ndarray:
        """Channels of ``modality`` reordered to ``names`` (mapping by name, never by position)."""
        have = self.bands[modality]
        missing = [b for b in names if b not in have]
        if missing:
            raise KeyError(f"{modality} has no bands {missing}; available: {have}")
        return self.images[modality][:, [have.index(b) for b in names]]


def segmentation_data(masks: np.ndarray, ignore_index: int, class_names: Sequence[str], **fields: Any) -> ProbeData:
    """A :class:`ProbeData` for per-pixel labels: ``labels`` is the per-image presence multi-hot of the classes."""
    k = len(class_names)
    valid = masks != ignore_index
    labels = np.zeros((len(masks), k), dtype=np.int64)
    for i in range(len(masks)):
        labels[i, np.unique(masks[i][valid[i]])] = 1
    return ProbeData(labels=labels, label_names=tuple(class_names), multilabel=True, masks=masks,
                     ignore_index=ignore_index, **fields)


def load_bigearthnet_mini(modalities: Sequence[str] = ("s2",)) -> ProbeData:
    """Load the embedded BigEarthNet-mini probe set (multi-label, 19 classes).

    101 real BigEarthNet v2 patches with their official split (the one patch without an official
    split is excluded), centre-cropped to 48 x 48 px at 10 m. S2 is L2A reflectance x 1e4
    (12 bands, B10 absent); S1 is VH/VV backscatter in dB and is NaN for the patches whose
    S1 copy was corrupt (see :func:`nan_policy`). Groups are MGRS tile ids.

    Args:
        modalities: Any of ``"s2"``, ``"s1"``.
    """
    unknown = set(modalities) - {"s1", "s2"}
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of ('s2', 's1'), got {modalities}")
    ref = resources.files("eobackbones.data").joinpath(_BEN_FILE)
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
        keep = z["split"] != "none"
        images = {m: z[m][keep].astype(np.float32) for m in modalities}
        bands = {m: tuple(str(b) for b in z[f"{m}_bands"]) for m in modalities}
        split = np.where(z["split"][keep] == "validation", "val", z["split"][keep])
        return ProbeData(
            name="bigearthnet_mini",
            images=images,
            bands=bands,
            units={m: {"s2": "reflectance_1e4", "s1": "dB"}[m] for m in modalities},
            labels=z["labels19"][keep].astype(np.int64),
            label_names=tuple(str(s) for s in z["label_names"]),
            multilabel=True,
            split=split.astype(str),
            groups=z["tile"][keep],
            ids=z["patch_id"][keep],
            meta={"country": z["country"][keep], "s1_valid": z["s1_valid"][keep],
                  "crop_window": tuple(int(v) for v in z["crop_window"])},
        )


def nan_policy(data: ProbeData, policy: Literal["drop", "keep"] = "drop") -> tuple[ProbeData, dict[str, Any]]:
    """Count (and with ``"drop"`` remove) samples with NaN pixels, e.g. missing S1 acquisitions.

    ``"drop"`` removes every sample with a NaN in any modality; ``"keep"`` keeps them for the preprocessing's NaN
    rule (``transforms.for_model(nan="fill" | "error")``: statistics over valid pixels and 0 after normalisation, or
    a one-line error), so the probe and ``for_model`` apply one rule.

    Returns:
        The dataset and a report with per-split counts of NaN samples (``"nan_samples"``) and samples kept.
    """
    if policy not in ("drop", "keep"):
        raise ValueError(f"policy must be 'drop' or 'keep' (filling is the preprocessing's NaN rule: "
                         f"transforms.for_model(nan='fill')), got {policy!r}")
    bad = np.zeros(len(data), dtype=bool)
    for x in data.images.values():
        bad |= np.isnan(x).reshape(len(x), -1).any(1)
    report: dict[str, Any] = {
        "policy": policy,
        "nan_samples": {s: int(bad[data.split == s].sum()) for s in SPLITS},
        "nan_ids": [] if data.ids is None else [str(i) for i in data.ids[bad]],
    }
    out = data.subset(~bad) if policy == "drop" else data
    report["kept"] = {s: int((out.split == s).sum()) for s in SPLITS}
    out.meta["nan_policy"] = report
    return out, report


def subsample_labels(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Seeded subset of ``indices`` for label-fraction experiments.

    Single-label (``labels`` 1-D): per class, ``max(1, round(fraction * n_c))`` samples, so the
    class balance of the pool is kept and no class vanishes. Multi-label (``labels`` 2-D):
    ``max(1, round(fraction * n))`` samples; first, classes are visited rarest first and, while
    the budget allows and the class is not yet covered, the first positive sample in a seeded
    permutation is taken; the rest of the budget is filled in permutation order. Classes with no
    positive in the pool, or beyond the budget, cannot be covered.

    Args:
        indices: Candidate row indices (e.g. the training split).
        labels: Labels of the whole dataset, indexed by ``indices``.
        fraction: Fraction in (0, 1].
        seed: Random seed.

    Returns:
        Sorted selected indices (a subset of ``indices``).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    indices = np.asarray(indices)
    if fraction == 1 or len(indices) == 0:
        return np.sort(indices)
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)[indices]
    if y.ndim == 1:
        chosen = []
        for c in np.unique(y):
            members = rng.permutation(indices[y == c])
            chosen.append(members[: max(1, round(fraction * len(members)))])
        return np.sort(np.concatenate(chosen))

    budget = max(1, round(fraction * len(indices)))
    order = rng.permutation(len(indices))
    taken = np.zeros(len(indices), dtype=bool)
    covered = np.zeros(y.shape[1], dtype=bool)
    counts = y.sum(0)
    for c in np.argsort(counts, kind="stable"):
        if taken.sum() >= budget:
            break
        if counts[c] == 0 or covered[c]:
            continue
        first = order[np.flatnonzero(y[order, c] > 0)[0]]
        taken[first] = True
        covered |= y[first] > 0
    for i in order:
        if taken.sum() >= budget:
            break
        taken[i] = True
    return np.sort(indices[taken])


def _read_array(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    try:
        import tifffile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading GeoTIFFs needs `pip install tifffile`") from e
    return tifffile.imread(path)


def _to_chw(x: np.ndarray, n_bands: int, path: Path) -> np.ndarray:
    """Put channels first, detecting the layout by the number of bands."""
    if x.ndim == 2 and n_bands == 1:
        return x[None]
    first = x.ndim == 3 and x.shape[0] == n_bands
    last = x.ndim == 3 and x.shape[-1] == n_bands
    if first and last:
        # Ambiguous cube: .npy files are documented as (C, H, W); tifffile returns contiguous
        # (interleaved) rasters as (H, W, C).
        return x if path.suffix.lower() == ".npy" else np.moveaxis(x, -1, 0)
    if first:
        return x
    if last:
        return np.moveaxis(x, -1, 0)
    raise ValueError(f"{path}: array of shape {x.shape} has no axis matching len(bands)={n_bands}; "
                     "expected (C, H, W) or (H, W, C)")


def _stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Per class: round(test_fraction * n) test, round(val_fraction * n) val, the rest train."""
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "train", dtype="<U5")
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(test_fraction * len(members))
        n_val = round(val_fraction * len(members))
        split[members[:n_test]] = "test"
        split[members[n_test:n_test + n_val]] = "val"
    return split


def load_folder(
    root: str | Path,
    bands: Sequence[str],
    modality: str = "s2",
    unit: str = "reflectance_1e4",
    split_seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    strict: bool = False,
    extensions: Sequence[str] = (".npy", ".tif", ".tiff"),
) -> ProbeData:
    """Load a single-label ``root/<class>/<sample>`` folder of ``.npy`` or GeoTIFF files.

    Arrays may be (C, H, W) or (H, W, C); the channel axis is the one whose length equals
    ``len(bands)`` (a band-count mismatch always raises, as it is a configuration error).
    Files that cannot be decoded, or whose spatial size differs from the first sample, are
    listed in ``meta["unreadable"]`` as ``(relative_path, reason)`` and skipped, unless
    ``strict`` is set. Splits are drawn per class with ``split_seed`` (tiny classes may end up
    entirely in train).

    Args:
        root: Folder with one sub-folder per class (class index = sorted folder order).
        bands: Band names in the files' channel order.
        modality: Modality key, e.g. ``"s2"``.
        unit: Unit of the stored values.
        split_seed: Seed of the stratified train/val/test split.
        val_fraction: Fraction of each class for validation.
        test_fraction: Fraction of each class for test.
        strict: Raise on the first unreadable file instead of reporting it.
        extensions: File suffixes to read (case-insensitive).
    """
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class sub-folders")
    exts = {e.lower() for e in extensions}
    images, labels, ids, unreadable = [], [], [], []
    for c, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            if path.suffix.lower() not in exts:
                continue
            rel = str(path.relative_to(root))
            try:
                raw = _read_array(path)
            # Decoders raise many exception types (struct/zlib/Tiff errors) for corrupt files.
            except Exception as e:
                if strict:
                    raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
                unreadable.append((rel, f"{type(e).__name__}: {e}"))
                continue
            x = _to_chw(raw, len(bands), path)
            if images and x.shape[1:] != images[0].shape[1:]:
                reason = f"spatial size {x.shape[1:]} != {images[0].shape[1:]}"
                if strict:
                    raise ValueError(f"{path}: {reason}")
                unreadable.append((rel, reason))
                continue
            images.append(x.astype(np.float32))
            labels.append(c)
            ids.append(rel)
    if not images:
        raise ValueError(f"{root}: no readable samples ({len(unreadable)} unreadable)")
    y = np.asarray(labels, dtype=np.int64)
    return ProbeData(
        name=root.name,
        images={modality: np.stack(images)},
        bands={modality: tuple(bands)},
        units={modality: unit},
        labels=y,
        label_names=tuple(classes),
        multilabel=False,
        split=_stratified_split(y, val_fraction, test_fraction, split_seed),
        groups=None,
        ids=np.asarray(ids),
        meta={"root": str(root), "unreadable": unreadable},
    )
