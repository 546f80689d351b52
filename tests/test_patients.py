"""Patients in the data: the manifests' patient column (``patient``, CLAM's ``case_id``, ``group``), CLAM's dataset
CSV read as it is, splits drawn by patient and stratified by label, a blank patient or one patient in two given
splits refused in one line, and every kind's datasets naming their items (``item_ids``) and patients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from test_cohort_checks import noise_png, write_features
from test_data import fake_mnist  # noqa: F401 - the fixture, used by name

from ips_search import run
from ips_search.config import DataConfig
from ips_search.data import build_datasets, preview_datasets
from ips_search.data.checks import patient_splits
from ips_search.data.cohort import items
from ips_search.data.slides import slide_entries, split_cohort
from ips_search.data.split import group_holdout as holdout
from ips_search.errors import ConfigError

PARTS = ("train", "val", "test")


def random_cohort(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``(slide, patient, label)`` rows: 1-4 slides per patient, labels imbalanced (a few ``tumor`` patients, two to
    four times as many ``normal`` ones), rows shuffled so that a patient's slides are not next to each other."""
    n_tumor = int(rng.integers(3, 7))
    n_normal = int(rng.integers(2 * n_tumor, 4 * n_tumor + 1))
    rows = []
    for p in range(n_tumor + n_normal):
        label = "tumor" if p < n_tumor else "normal"
        rows += [(f"s{p:02d}-{k}", f"case{p:02d}", label) for k in range(int(rng.integers(1, 5)))]
    return [rows[i] for i in rng.permutation(len(rows))]


def features_cohort(root: Path, rows: list[tuple[str, str, str]], header: str = "slide,patient,label") -> Path:
    """``root/<slide>.h5`` (distinct random features) and a manifest with ``header`` over ``rows``' three fields."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for slide, *_ in rows:
        write_features(root / f"{slide}.h5", rng.standard_normal((4, 4)).astype(np.float32))
    (root / "labels.csv").write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    return root / "labels.csv"


def slides_manifest(root: Path, rows: list[tuple[str, ...]], header: str = "path,patient,label") -> Path:
    """A slides manifest over distinct small files (only their names and bytes are read to split them)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (path, *_) in enumerate(rows):
        (root / path).write_bytes(b"slide %d" % i)
    (root / "cohort.csv").write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    return root / "cohort.csv"


def one_line(call, *args) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def assert_patients_whole_and_both_classes(parts: dict[str, list[tuple[str, str, int]]], rows) -> None:
    """``parts``: split -> ``(item, patient, label)``; every row once, every patient in one split, two classes in
    each split, and each item's patient the manifest's."""
    truth = {slide: patient for slide, patient, _ in rows}
    assert sorted(i for part in parts.values() for i, _, _ in part) == sorted(truth)
    owner = {}
    for split, part in parts.items():
        assert part, f"{split} is empty"
        assert {label for _, _, label in part} == {0, 1}, f"{split} holds one class"
        for item, patient, _ in part:
            assert truth[item] == patient
            assert owner.setdefault(patient, split) == split, f"patient {patient} in {owner[patient]} and {split}"


# ---------------------------------------------------------------- the drawn split


@pytest.mark.parametrize("seed", range(5))
def test_drawn_feature_splits_keep_every_patient_in_one_split_and_both_classes_in_each(tmp_path, seed):
    rows = random_cohort(np.random.default_rng(seed))
    manifest = features_cohort(tmp_path / "f", rows)
    cfg = DataConfig(dataset="features", root=str(manifest.parent), cache_dir=str(tmp_path / "cache"), seed=seed)
    splits = build_datasets(cfg)
    parts = {}
    for split in PARTS:
        ds = getattr(splits, split)
        assert ds.item_ids == [f.slide for f in ds.files] and len(ds.patients) == len(ds)
        parts[split] = list(zip(ds.item_ids, ds.patients, ds.targets["label"].tolist(), strict=True))
    assert_patients_whole_and_both_classes(parts, rows)
    n_patients = len({p for _, p, _ in rows})
    test_patients = {p for _, p, _ in parts["test"]}
    assert 1 <= len(test_patients) <= n_patients // 2  # about test_fraction (0.2) of the patients
    again = build_datasets(cfg)
    assert [getattr(again, s).item_ids for s in PARTS] == [getattr(splits, s).item_ids for s in PARTS]  # seeded


@pytest.mark.parametrize("seed", range(5))
def test_drawn_slide_splits_keep_every_patient_in_one_split_and_both_classes_in_each(tmp_path, seed):
    rows = [(f"{slide}.png", patient, label) for slide, patient, label in random_cohort(np.random.default_rng(seed))]
    manifest = slides_manifest(tmp_path / "s", rows)
    cfg = DataConfig(dataset="slides", manifest=str(manifest), cache_dir=str(tmp_path / "cache"), seed=seed)
    entries = slide_entries(cfg)
    assert entries.names == [Path(path).stem for path, _, _ in rows]  # the file names without extension
    drawn = split_cohort(entries, cfg)
    parts = {
        split: [(entries.paths[i].name, entries.patients[i], entries.labels[i]) for i in idx]
        for split, idx in drawn.items()
    }
    assert_patients_whole_and_both_classes(parts, rows)
    assert all(np.array_equal(drawn[s], split_cohort(entries, cfg)[s]) for s in PARTS)  # seeded


def test_another_seed_draws_another_split(tmp_path):
    rows = random_cohort(np.random.default_rng(0))
    features_cohort(tmp_path / "f", rows)
    tests = {
        seed: build_datasets(DataConfig(dataset="features", root=str(tmp_path / "f"), seed=seed)).test.item_ids
        for seed in range(4)
    }
    assert len({tuple(ids) for ids in tests.values()}) > 1


def test_holdout_holds_out_whole_patients_stratified():
    patients = [f"p{i // 2}" for i in range(40)]  # 20 patients of 2 slides
    labels = [int(i < 12) for i in range(40)]  # 6 patients of class 1, 14 of class 0
    held = holdout(patients, labels, 0.2, seed=3)
    assert held.sum() == 8  # 4 of 20 patients: one of five folds
    assert {patients[i] for i in np.flatnonzero(held)}.isdisjoint(patients[i] for i in np.flatnonzero(~held))
    assert {labels[i] for i in np.flatnonzero(held)} == {0, 1}
    singles = holdout([str(i) for i in range(20)], [int(i < 6) for i in range(20)], 0.25, seed=0)
    assert singles.sum() == 5 and {int(i < 6) for i in np.flatnonzero(singles)} == {0, 1}


def test_a_few_patients_still_split():
    """Fewer items per class than folds: scikit-learn cannot stratify, the draw is then by patient alone."""
    out = patient_splits(["a", "b", "c", "d"], [0, 0, 1, 1], None, 0.2, 0.2, 0, "m")
    assert (out.count("train"), out.count("val"), out.count("test")) == (2, 1, 1)


def test_fewer_than_three_patients_is_one_line(tmp_path):
    rows = [("a1", "A", "tumor"), ("a2", "A", "tumor"), ("b1", "B", "normal"), ("b2", "B", "normal")]
    manifest = features_cohort(tmp_path / "f", rows)
    message = one_line(build_datasets, DataConfig(dataset="features", root=str(manifest.parent)))
    assert f"manifest {manifest} holds 2 patient(s); a seeded split needs at least 3" in message
    slides = slides_manifest(tmp_path / "s", [(f"{s}.png", p, y) for s, p, y in rows])
    cfg = DataConfig(dataset="slides", manifest=str(slides))
    assert f"manifest {slides} holds 2 patient(s)" in one_line(split_cohort, slide_entries(cfg), cfg)


def test_a_given_split_without_val_draws_validation_by_patient(tmp_path):
    rows = [(f"s{i}", f"case{i // 2}", "tumor" if (i // 2) % 2 else "normal") for i in range(16)]  # 8 patients
    split = ["test" if i >= 12 else "train" for i in range(16)]
    root = tmp_path / "f"
    features_cohort(root, rows)
    lines = ["slide,patient,label,split", *(",".join([*r, s]) for r, s in zip(rows, split, strict=True))]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    splits = build_datasets(DataConfig(dataset="features", root=str(root)))
    assert sorted(splits.test.item_ids) == [f"s{i}" for i in range(12, 16)]
    val, train = set(splits.val.patients), set(splits.train.patients)
    assert val and train and val.isdisjoint(train) and val | train == {f"case{i}" for i in range(6)}


# ---------------------------------------------------------------- the patient column and CLAM's CSV


@pytest.mark.parametrize("column", ["patient", "case_id", "group"])
def test_a_patient_column_is_read_by_any_of_its_names(tmp_path, column):
    rows = [(f"s{i}", f"case{i // 3}", "tumor" if (i // 3) % 2 else "normal") for i in range(18)]  # 6 patients
    features_cohort(tmp_path / "f", rows, header=f"slide,{column},label")
    splits = build_datasets(DataConfig(dataset="features", root=str(tmp_path / "f")))
    truth = {s: p for s, p, _ in rows}
    for ds in (splits.train, splits.val, splits.test):
        assert ds.patients == [truth[s] for s in ds.item_ids]
        assert len(set(ds.patients)) * 3 == len(ds)  # whole patients: three slides each
    manifest = slides_manifest(tmp_path / "s", [(f"{s}.png", p, y) for s, p, y in rows], f"path,{column},label")
    entries = slide_entries(DataConfig(dataset="slides", manifest=str(manifest)))
    assert entries.patients == [p for _, p, _ in rows] and entries.by_patient


def test_without_a_patient_column_each_slide_is_its_own_patient(tmp_path):
    rows = [(f"s{i}", "", "tumor" if i % 2 else "normal") for i in range(10)]
    root = tmp_path / "f"
    features_cohort(root, rows)
    (root / "labels.csv").write_text("\n".join(["slide,label", *(f"{s},{y}" for s, _, y in rows)]) + "\n")
    splits = build_datasets(DataConfig(dataset="features", root=str(root)))
    for ds in (splits.train, splits.val, splits.test):
        assert ds.patients == ds.item_ids and ds.item_ids == [f.slide for f in ds.files]


CLAM_ROWS = [  # CLAM's dataset_csv layout (as in its tumor_subtyping_dummy_clean.csv): a patient may have two slides
    ("patient_0", "slide_0", "normal_tissue"),
    ("patient_1", "slide_1", "tumor_tissue"),
    ("patient_1", "slide_2", "tumor_tissue"),
    ("patient_2", "slide_3", "normal_tissue"),
    ("patient_3", "slide_4", "tumor_tissue"),
    ("patient_4", "slide_5", "normal_tissue"),
    ("patient_4", "slide_6", "normal_tissue"),
    ("patient_5", "slide_7", "tumor_tissue"),
    ("patient_6", "slide_8", "normal_tissue"),
    ("patient_7", "slide_9", "tumor_tissue"),
    ("patient_8", "slide_10", "normal_tissue"),
    ("patient_9", "slide_11", "tumor_tissue"),
    ("patient_9", "slide_12", "tumor_tissue"),
]


def _clam_plain(rows) -> str:
    return "\n".join(["case_id,slide_id,label", *(",".join(r) for r in rows)]) + "\n"


def _clam_quoted(rows) -> str:  # as camelyon_clean.csv: every field quoted, columns reordered, an extra column
    lines = ['"case_id","label","slide_id","test"', *(f'"{c}","{y}","{s}",0' for c, s, y in rows)]
    return "\n".join(lines) + "\n"


def _clam_indexed(rows) -> str:  # as tcga_kidney_clean.csv: pandas' unnamed index column first
    return "\n".join([",case_id,slide_id,label", *(f"{i},{c},{s},{y}" for i, (c, s, y) in enumerate(rows))]) + "\n"


@pytest.mark.parametrize("layout", [_clam_plain, _clam_quoted, _clam_indexed], ids=["plain", "quoted", "indexed"])
def test_clams_dataset_csv_is_a_features_manifest_as_it_is(tmp_path, layout):
    root = tmp_path / "h5_files"
    features_cohort(root, [(s, c, y) for c, s, y in CLAM_ROWS])
    (tmp_path / "tumor_subtyping.csv").write_text(layout(CLAM_ROWS))
    cfg = DataConfig(dataset="features", root=str(root), manifest=str(tmp_path / "tumor_subtyping.csv"))
    splits = build_datasets(cfg)
    case_of = {s: c for c, s, _ in CLAM_ROWS}
    label_of = {s: y for _, s, y in CLAM_ROWS}
    assert splits.train.classes == ["normal_tissue", "tumor_tissue"]
    owner = {}
    for split in PARTS:
        ds = getattr(splits, split)
        assert ds.patients == [case_of[s] for s in ds.item_ids]
        assert [ds.classes[y] for y in ds.targets["label"].tolist()] == [label_of[s] for s in ds.item_ids]
        for patient in ds.patients:
            assert owner.setdefault(patient, split) == split
    assert sorted(owner) == sorted({c for c, _, _ in CLAM_ROWS})
    table = items(splits)  # the cohort table the search writes as splits.csv
    assert sorted(table["slide"]) == sorted(case_of) and (table["patient"] == table["slide"].map(case_of)).all()


# ---------------------------------------------------------------- bad patients: one line, exit 2


def features_space(root: Path) -> str:
    return yaml.safe_dump(
        {
            "data": {"dataset": "features", "root": str(root)},
            "model": {"encoder": "projector", "dim": 16, "heads": 2, "d_k": 8, "d_v": 8, "d_inner": 32},
            "train": {"epochs": 1, "batch_size": 4, "warm_start": False},
            "search": {"memory_size": {"low": 2, "high": 3}, "lr": {"choices": [1e-3]}},
        }
    )


def _run(tmp_path: Path, capsys, dry_run: bool) -> str:
    (tmp_path / "space.yaml").write_text(features_space(tmp_path / "f"))
    argv = ["--space", str(tmp_path / "space.yaml"), "--results-dir", str(tmp_path / "results"), "--no-dashboard"]
    assert run.main(argv + (["--dry-run"] if dry_run else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_blank_patient_cell_is_one_line_exit_2(tmp_path, cache_dir, capsys, no_ray, dry_run):
    rows = [(f"s{i}", f"case{i}", "tumor" if i % 2 else "normal") for i in range(8)]
    rows[5] = ("s5", "", "tumor")
    manifest = features_cohort(tmp_path / "f", rows)
    err = _run(tmp_path, capsys, dry_run)
    assert f"manifest {manifest} line 7 (slide 's5') has an empty patient cell" in err
    assert "fill in every slide's patient, or remove the patient column" in err


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_patient_in_train_and_test_is_one_line_exit_2(tmp_path, cache_dir, capsys, no_ray, dry_run):
    rows = [(f"s{i}", f"case{i}", "tumor" if i % 2 else "normal") for i in range(8)]
    split = ["train", "train", "train", "train", "val", "val", "test", "test"]
    rows[7] = ("s7", "case1", "tumor")  # case1's other slide trains
    features_cohort(tmp_path / "f", rows)
    lines = ["slide,patient,label,split", *(",".join([*r, s]) for r, s in zip(rows, split, strict=True))]
    (tmp_path / "f" / "labels.csv").write_text("\n".join(lines) + "\n")
    err = _run(tmp_path, capsys, dry_run)
    assert "patient 'case1' has slides in both the train and the test split" in err
    assert "put all of a patient's slides in one split" in err


@pytest.mark.parametrize(("first", "then", "why"), [("train", "val", "trained on"), ("val", "test", "was selected on")])
def test_a_patient_in_train_and_val_or_val_and_test_is_refused(tmp_path, first, then, why):
    rows = [(f"s{i}", f"case{i}", "tumor" if i % 2 else "normal") for i in range(8)]
    split = ["train", "train", "train", "train", "val", "val", "test", "test"]
    moved = split.index(then) + 1  # the second slide of that split joins a patient of the first
    rows[moved] = (f"s{moved}", f"case{split.index(first) + 1}", rows[moved][2])
    root = tmp_path / "f"
    features_cohort(root, rows)
    lines = ["slide,patient,label,split", *(",".join([*r, s]) for r, s in zip(rows, split, strict=True))]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    message = one_line(build_datasets, DataConfig(dataset="features", root=str(root)))
    patient = f"case{split.index(first) + 1}"
    assert f"patient {patient!r} has slides in both the {first} and the {then} split, so {then} would score" in message
    assert f"a patient the model {why}" in message


def test_a_slides_manifest_refuses_a_blank_patient_and_a_patient_in_two_splits(tmp_path):
    paths = [noise_png(tmp_path / "s" / f"{i}.png", i) for i in range(6)]
    labels = ["a", "b"] * 3
    blank = tmp_path / "s" / "blank.csv"
    blank.write_text(
        "path,label,case_id\n"
        + "".join(f"{p.name},{y},{'' if i == 2 else i}\n" for i, (p, y) in enumerate(zip(paths, labels, strict=True)))
    )
    cfg = DataConfig(
        dataset="slides",
        manifest=str(blank),
        patch_size=32,
        level=0,
        min_foreground=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    message = one_line(build_datasets, cfg)
    assert one_line(preview_datasets, cfg) == message
    assert f"manifest {blank} line 4 (slide '2') has an empty case_id cell" in message
    leak = tmp_path / "s" / "leak.csv"
    splits = ["train", "train", "train", "test", "test", "train"]
    patients = ["p0", "p1", "p2", "p3", "p4", "p4"]  # p4: one slide in test, one in train
    leak.write_text(
        "path,label,split,patient\n"
        + "".join(f"{p.name},{y},{s},{c}\n" for p, y, s, c in zip(paths, labels, splits, patients, strict=True))
    )
    cfg = DataConfig(
        dataset="slides",
        manifest=str(leak),
        patch_size=32,
        level=0,
        min_foreground=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    message = one_line(build_datasets, cfg)
    assert one_line(preview_datasets, cfg) == message
    assert "patient 'p4' has slides in both the train and the test split" in message


# ---------------------------------------------------------------- every kind names its items and their patients


def assert_named(splits) -> None:
    """Each split's ``item_ids`` and ``patients`` aligned with its items, the ids unique across the cohort."""
    ids = []
    for split in PARTS:
        ds = getattr(splits, split)
        assert len(ds.item_ids) == len(ds.patients) == len(ds) > 0
        assert all(isinstance(i, str) for i in ds.item_ids + ds.patients)
        ids += ds.item_ids
    assert len(set(ids)) == len(ids)
    table = items(splits)
    assert table["slide"].tolist() == ids


def test_slides_datasets_name_their_slides_and_patients(tmp_path):
    paths = [noise_png(tmp_path / "s" / f"slide{i}.png", i) for i in range(9)]
    rows = [(p.name, f"case{i // 3}" if i < 6 else f"case{i}", "ab"[i % 2]) for i, p in enumerate(paths)]
    manifest = tmp_path / "s" / "cohort.csv"
    manifest.write_text("path,patient,label\n" + "".join(f"{p},{c},{y}\n" for p, c, y in rows))
    cfg = DataConfig(
        dataset="slides",
        manifest=str(manifest),
        patch_size=32,
        level=0,
        min_foreground=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    splits = build_datasets(cfg)
    assert_named(splits)
    patient_of = {Path(p).stem: c for p, c, _ in rows}
    for split in PARTS:
        ds = getattr(splits, split)
        assert ds.item_ids == [p.stem for p in ds.paths]
        assert ds.patients == [patient_of[i] for i in ds.item_ids]


def test_slides_sharing_a_file_name_are_named_by_their_paths(tmp_path):
    for cls in ("a", "b"):
        for i in range(3):
            noise_png(tmp_path / "root" / cls / f"{i}.png", ord(cls) * 10 + i)
    entries = slide_entries(DataConfig(dataset="slides", root=str(tmp_path / "root")))
    assert entries.names == [f"{c}/{i}.png" for c in "ab" for i in range(3)] and entries.patients == entries.names


def test_folder_datasets_name_their_images_by_path_and_split_them_stratified(tmp_path):
    for cls, n, first in (("cat", 12, 0), ("dog", 4, 100)):
        for i in range(n):
            noise_png(tmp_path / "img" / cls / f"{i}.png", first + i)
    splits = build_datasets(
        DataConfig(
            dataset="folder",
            root=str(tmp_path / "img"),
            image_size=32,
            patch_size=16,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    assert_named(splits)
    for split in PARTS:
        ds = getattr(splits, split)
        assert ds.item_ids == [p.relative_to(tmp_path / "img").as_posix() for p in ds.paths]
        assert ds.patients == ds.item_ids
        assert {ds.classes[y] for y in ds.targets["label"].tolist()} == {"cat", "dog"}  # 4 dogs: one in each


def test_megapixel_datasets_name_their_canvases(cache_dir):
    cfg = DataConfig(canvas_size=96, digit_size=16, n_digits=3, n_noise=0, n_train=10, n_test=4, cache_dir=cache_dir)
    splits = build_datasets(cfg)
    assert_named(splits)
    assert splits.train.item_ids == [f"train-{i:05d}" for i in range(8)]
    assert splits.val.item_ids == ["val-00000", "val-00001"] and splits.test.item_ids[-1] == "test-00003"
    assert splits.test.patients == splits.test.item_ids


def test_mnist_datasets_name_their_digits_by_mnist_index(fake_mnist):  # noqa: F811 - the fixture
    cfg = DataConfig(dataset="mnist-resized", cache_dir=fake_mnist, image_size=40, patch_size=20, n_train=20, n_test=10)
    splits = build_datasets(cfg)
    assert_named(splits)
    assert all(i.startswith("train-") for i in splits.train.item_ids + splits.val.item_ids)
    assert all(i.startswith("test-") for i in splits.test.item_ids)
    assert splits.val.patients == splits.val.item_ids
