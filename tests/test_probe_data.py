"""Probe datasets: the embedded BigEarthNet-mini, NaN policy, label fractions, folder loader."""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from eobackbones.data import ProbeData, load_bigearthnet_mini, load_folder, nan_policy, subsample_labels

EUROSAT = Path(__file__).parent / "data" / "eurosat-ms-4"
EUROSAT_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    """The embedded file read directly, as ground truth independent of the loader."""
    with resources.as_file(resources.files("eobackbones.data") / "bigearthnet_mini.npz") as p:
        assert p.stat().st_size <= 6_000_000
        with np.load(p) as z:
            return {k: z[k] for k in z.files}


def test_embedded_file_contents(raw: dict[str, np.ndarray]) -> None:
    assert raw["s2"].shape == (102, 12, 48, 48) and raw["s2"].dtype == np.uint16
    assert raw["s1"].shape == (102, 2, 48, 48) and raw["s1"].dtype == np.float16
    assert tuple(raw["s2_bands"]) == ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
    assert {s: int((raw["split"] == s).sum()) for s in ("train", "validation", "test", "none")} == {
        "train": 44, "validation": 26, "test": 31, "none": 1}
    nan_rows = np.isnan(raw["s1"]).reshape(102, -1).all(1)
    assert nan_rows.sum() == 9 and np.array_equal(nan_rows, ~raw["s1_valid"])
    assert not np.isnan(raw["s1"][raw["s1_valid"]]).any()


def test_load_bigearthnet_mini(raw: dict[str, np.ndarray]) -> None:
    data = load_bigearthnet_mini(("s2", "s1"))
    assert len(data) == 101 and data.multilabel and data.num_classes == 19
    assert data.images["s2"].dtype == np.float32 and data.images["s2"].shape == (101, 12, 48, 48)
    assert data.bands["s1"] == ("VH", "VV") and data.units == {"s2": "reflectance_1e4", "s1": "dB"}
    assert {s: len(data.indices(s)) for s in ("train", "val", "test")} == {"train": 44, "val": 26, "test": 31}
    keep = raw["split"] != "none"
    np.testing.assert_array_equal(data.images["s2"], raw["s2"][keep])
    np.testing.assert_array_equal(data.labels, raw["labels19"][keep])
    assert data.groups is not None and (data.groups == "33UUP").sum() == 24
    assert data.select_bands("s2", ["B04", "B03", "B02"]).shape[1] == 3
    assert set(load_bigearthnet_mini().images) == {"s2"}
    with pytest.raises(ValueError):
        load_bigearthnet_mini(("rgb",))


def test_nan_policy_drop_and_keep(raw: dict[str, np.ndarray]) -> None:
    data = load_bigearthnet_mini(("s2", "s1"))
    keep = raw["split"] != "none"
    invalid = ~raw["s1_valid"][keep]
    split = np.where(raw["split"][keep] == "validation", "val", raw["split"][keep])
    expected = {s: int((invalid & (split == s)).sum()) for s in ("train", "val", "test")}
    assert expected == {"train": 4, "val": 3, "test": 2}

    dropped, report = nan_policy(data, "drop")
    assert report["nan_samples"] == expected
    assert report["kept"] == {s: int((~invalid & (split == s)).sum()) for s in ("train", "val", "test")}
    assert len(dropped) == 92 and not any(np.isnan(x).any() for x in dropped.images.values())
    assert set(report["nan_ids"]) == set(raw["patch_id"][keep][invalid])
    np.testing.assert_array_equal(dropped.ids, raw["patch_id"][keep][~invalid])
    assert len(data) == 101 and np.isnan(data.images["s1"]).any()  # input untouched

    kept, report = nan_policy(data, "keep")  # counted; the preprocessing's NaN rule decides (transforms)
    assert kept is data and report["nan_samples"] == expected and len(kept) == 101
    with pytest.raises(ValueError, match="for_model"):
        nan_policy(data, "fill")

    s2_only, report = nan_policy(load_bigearthnet_mini(), "drop")
    assert len(s2_only) == 101 and sum(report["nan_samples"].values()) == 0


def test_subsample_labels_single_label() -> None:
    labels = np.repeat(np.arange(4), [40, 20, 10, 2])
    pool = np.arange(len(labels))
    sub = subsample_labels(pool, labels, 0.1, seed=0)
    assert np.bincount(labels[sub]).tolist() == [4, 2, 1, 1]  # rounded per class, at least one
    np.testing.assert_array_equal(sub, subsample_labels(pool, labels, 0.1, seed=0))
    assert not np.array_equal(sub, subsample_labels(pool, labels, 0.1, seed=1))
    np.testing.assert_array_equal(subsample_labels(pool[::-1], labels, 1.0), pool)


def test_subsample_labels_multilabel_covers_classes() -> None:
    data = load_bigearthnet_mini()
    train = data.indices("train")
    present = data.labels[train].sum(0) > 0
    for seed in range(3):
        sub = subsample_labels(train, data.labels, 0.5, seed=seed)
        assert len(sub) == 22 and set(sub) <= set(train)
        assert np.array_equal(data.labels[sub].sum(0) > 0, present)
    tiny = subsample_labels(train, data.labels, 0.05, seed=0)  # budget 2 < #classes: best effort
    assert len(tiny) == 2
    with pytest.raises(ValueError):
        subsample_labels(train, data.labels, 0.0)


def test_load_folder_eurosat_tiffs() -> None:
    data = load_folder(EUROSAT, EUROSAT_BANDS)
    assert isinstance(data, ProbeData) and not data.multilabel
    assert data.images["s2"].shape == (4, 13, 64, 64) and data.images["s2"].dtype == np.float32
    assert data.label_names == ("AnnualCrop", "Highway", "Pasture", "SeaLake")
    assert data.labels.tolist() == [0, 1, 2, 3] and data.meta["unreadable"] == []
    assert set(data.split) == {"train"}  # one file per class: nothing to hold out
    # Band order is by name: B8A is the last channel of these files.
    np.testing.assert_array_equal(data.select_bands("s2", ["B8A"])[:, 0], data.images["s2"][:, 12])
    # Water absorbs NIR: SeaLake is darker in B08 than the vegetated Pasture tile.
    b08 = data.select_bands("s2", ["B08"]).mean((1, 2, 3))
    assert b08[3] < b08[2]
    with pytest.raises(ValueError, match=r"no axis matching len\(bands\)=12"):
        load_folder(EUROSAT, EUROSAT_BANDS[:12])


def test_load_folder_npy_layouts_and_unreadable(tmp_path: Path) -> None:
    import tifffile

    root = tmp_path / "ds"
    shutil.copytree(EUROSAT, root)
    hwc = tifffile.imread(EUROSAT / "Pasture" / "Pasture_300.tif")
    np.save(root / "Pasture" / "chw.npy", np.moveaxis(hwc, -1, 0))
    np.save(root / "Pasture" / "hwc.npy", hwc)
    (root / "SeaLake" / "broken.tif").write_bytes(b"not a tiff")
    (root / "SeaLake" / "notes.txt").write_text("ignored: not an image suffix")

    data = load_folder(root, EUROSAT_BANDS, split_seed=0)
    assert len(data) == 6 and np.bincount(data.labels).tolist() == [1, 1, 3, 1]
    ref = data.images["s2"][list(data.ids).index("Pasture/Pasture_300.tif")]
    for name in ("Pasture/chw.npy", "Pasture/hwc.npy"):
        np.testing.assert_array_equal(data.images["s2"][list(data.ids).index(name)], ref)
    assert [p for p, _ in data.meta["unreadable"]] == ["SeaLake/broken.tif"]
    assert data.split.tolist().count("train") == 4  # Pasture: 3 files -> 1 val, 1 test, 1 train

    with pytest.raises(ValueError, match="broken.tif"):
        load_folder(root, EUROSAT_BANDS, strict=True)
