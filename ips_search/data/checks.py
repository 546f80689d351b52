"""Checks on a cohort as a whole, run when its datasets are built or previewed (``--dry-run``), before any trial.

Each one turns data that would train and report nonsense without a word into a one-line :class:`ConfigError`:

* :func:`check_classes`: one class in the whole cohort or in the training split (a classifier that always answers
  that class scores 1.0), or in a validation / test split of two or more items that the user gave (a split column,
  a ``test/`` folder). A seeded draw is not refused for landing on one class by chance.
* :func:`check_disjoint`: one file in two splits, found by its identity (the same file after resolving links:
  same device and inode) or, for files up to :data:`HASH_LIMIT` bytes, by the same content (SHA-256; only files of
  equal size are hashed, so a cohort of distinct sizes costs one ``stat`` per file; a cohort that passed is
  remembered in the cache directory, so the builds that follow in every trial do not read its files again).
* :func:`inside`: a manifest's relative path, or a slide name, that points outside its folder (``../x``).
* :func:`check_finite`: NaN or Inf in a tensor of features as it is read, naming the file.
* :func:`read_patients`: a manifest's patient column (``patient``, CLAM's ``case_id``, or ``group``) with a blank
  cell; :func:`check_patients`: one patient's slides in two splits of a split column (the test split would score a
  patient the model trained on).

And the seeded draw of a cohort that gives no split of its own (:func:`patient_splits`): whole patients, labels
stratified, so the same checks hold for a drawn split as for a given one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ips_search.data.cache import cache_key, cache_root
from ips_search.data.split import group_holdout
from ips_search.errors import ConfigError

HASH_LIMIT = 64 << 20  # files up to 64 MB are compared by content; bigger ones (slides) by identity only
PATIENT_COLUMNS = ("patient", "case_id", "group")  # a manifest's patient column, first found wins (case_id: CLAM)
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime): SHA-256, kept for the process


def _names(classes: Sequence[str], labels: set[int]) -> str:
    return ", ".join(repr(classes[i]) if 0 <= i < len(classes) else repr(i) for i in sorted(labels))


def check_classes(
    splits: Mapping[str, Sequence[int]], classes: Sequence[str], where: str, given: Collection[str] = ()
) -> None:
    """Refuse a cohort (``splits``: split name -> class indices of its items) that cannot measure a classifier.

    Always refused: one class in all items, or in ``train``. A validation or test split is refused for one class
    only when its items were ``given`` by the user (a split column, a ``test/`` folder) and it has two or more: a
    seeded draw of a small cohort can land on one class by chance (another seed changes it), a given split cannot.
    ``where`` names the data in the message (a folder or a manifest)."""
    found = {int(label) for labels in splits.values() for label in labels}
    total = sum(len(labels) for labels in splits.values())
    if len(found) < 2:
        raise ConfigError(
            f"{where} has one class ({_names(classes, found)}) in all its {total} item(s); a classifier needs at least "
            "2 (it would score 1.0 by always answering that one): add items of another class"
        )
    for split, labels in splits.items():
        present = {int(label) for label in labels}
        if len(present) != 1 or not (split == "train" or (split in given and len(labels) >= 2)):
            continue
        what = {"train": "training", "val": "validation", "test": "test"}.get(split, split)
        if split == "train":
            raise ConfigError(
                f"{where}: the training split's {len(labels)} item(s) are all of class {_names(classes, present)}; "
                "a model trained on one class always answers it: give the training split items of another class"
            )
        raise ConfigError(
            f"{where}: the {what} split's {len(labels)} items are all of class {_names(classes, present)}, so its "
            f"scores cannot tell a model from one that always answers it: give the {what} split items of another class"
        )


def _digest(path: Path, size: int) -> str:
    key = (str(path.resolve()), size, path.stat().st_mtime_ns)
    if key not in _DIGESTS:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        _DIGESTS[key] = sha.hexdigest()
    return _DIGESTS[key]


def check_disjoint(splits: Mapping[str, Sequence[Path]], where: str, cache_dir: str | None = None) -> None:
    """Refuse one file in two splits: the same file (links resolved) or, up to :data:`HASH_LIMIT`, the same bytes.

    A cohort that passed is remembered in the cache directory by every file's identity (path, size, mtime), so the
    builds that follow (every trial builds its datasets) cost one ``stat`` per file, not a read of the files."""
    stats = {split: [(path, path.stat()) for path in paths] for split, paths in splits.items()}
    fields = {
        "v": 1,
        "splits": {k: [(str(p.resolve()), st.st_size, st.st_mtime_ns) for p, st in v] for k, v in stats.items()},
    }
    passed = cache_root(cache_dir) / "cohort-checked" / cache_key(fields)
    if passed.exists():
        return
    owner: dict[tuple[int, int], tuple[str, Path]] = {}
    by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    for split, files in stats.items():
        for path, stat in files:
            key = (stat.st_dev, stat.st_ino)
            if key in owner and owner[key][0] != split:
                raise _leak(where, owner[key], (split, path), "are the same file")
            owner.setdefault(key, (split, path))
            if stat.st_size <= HASH_LIMIT:
                by_size[stat.st_size].append((split, path))
    for size, files in by_size.items():
        if len({split for split, _ in files}) < 2:  # same size, one split: no leak possible
            continue
        seen: dict[str, tuple[str, Path]] = {}
        for split, path in files:
            digest = _digest(path, size)
            if digest in seen and seen[digest][0] != split:
                raise _leak(where, seen[digest], (split, path), "have the same content")
            seen.setdefault(digest, (split, path))
    with contextlib.suppress(OSError):  # a read-only cache only costs the next build the same check
        passed.parent.mkdir(parents=True, exist_ok=True)
        passed.touch()


def _leak(where: str, first: tuple[str, Path], second: tuple[str, Path], how: str) -> ConfigError:
    (split_a, a), (split_b, b) = first, second
    return ConfigError(
        f"{where}: {split_a} item {a} and {split_b} item {b} {how}, so the {split_b} split would score an item "
        "the model trained or was selected on: remove one copy"
    )


def inside(folder: Path, name: str | os.PathLike[str], what: str) -> Path:
    """``folder / name`` when ``name`` is relative and stays inside ``folder`` (``..`` resolved by name, links kept),
    else a ConfigError naming ``what`` (e.g. "manifest m.csv line 3")."""
    rel = Path(name)
    joined = Path(os.path.normpath(folder / rel))
    if rel.is_absolute() or not joined.is_relative_to(Path(os.path.normpath(folder))):
        raise ConfigError(
            f"{what} names {str(name)!r}, outside {folder}; keep the files under that folder (or give the path "
            "absolute where an absolute path is allowed)"
        )
    return folder / rel


def check_finite(values: torch.Tensor, path: str | os.PathLike[str]) -> torch.Tensor:
    """``values`` unchanged, or a ConfigError naming ``path`` when any is NaN or infinite."""
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ConfigError(
            f"feature file {path} holds {bad} NaN or infinite value(s); re-extract that slide (an encoder in float16 "
            "can overflow: extract in float32) or remove it from the manifest"
        )
    return values


def patient_column(columns: Collection[str]) -> str | None:
    """The manifest column that names each slide's patient (the first of :data:`PATIENT_COLUMNS` present), or None."""
    return next((c for c in PATIENT_COLUMNS if c in columns), None)


def read_patients(rows: Sequence[Mapping[str, str]], names: Sequence[str], where: str) -> list[str]:
    """The patient of each manifest row (``rows``, header stripped, the first on line 2): its patient column's cell,
    or, without such a column, the slide's own name (``names``): each slide its own patient. A blank cell is a
    ConfigError naming the line and the slide."""
    column = patient_column(rows[0].keys()) if rows else None
    if column is None:
        return [str(name) for name in names]
    patients = []
    for line, (row, name) in enumerate(zip(rows, names, strict=True), start=2):
        patient = (row.get(column) or "").strip()
        if not patient:
            raise ConfigError(
                f"{where} line {line} (slide {name!r}) has an empty {column} cell; fill in every slide's patient, "
                f"or remove the {column} column so that each slide is its own patient"
            )
        patients.append(patient)
    return patients


def check_patients(splits: Mapping[str, Sequence[str]], where: str) -> None:
    """Refuse one patient in two splits (``splits``: split name -> the patient of each of its items, in the order
    train, val, test): a split column that puts a patient's slides in train and test lets test score a patient the
    model trained on; in train and val, validation does (and so selects on it); in val and test, test scores a
    patient the model was selected on."""
    owner: dict[str, str] = {}
    for split, patients in splits.items():
        for patient in patients:
            first = owner.setdefault(str(patient), split)
            if first != split:
                raise ConfigError(
                    f"{where}: patient {patient!r} has slides in both the {first} and the {split} split, so {split} "
                    f"would score a patient the model {'trained' if first == 'train' else 'was selected'} on: put "
                    "all of a patient's slides in one split (or drop the split column: the draw keeps patients whole)"
                )


def patient_splits(
    patients: Sequence[str],
    labels: Sequence[int],
    given: Sequence[str] | None,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    where: str,
    unit: str = "patient",
) -> list[str]:
    """Each item's split (``train`` / ``val`` / ``test``), whole patients in each.

    ``given`` (a split column) is kept; where it names no ``val`` item, validation is drawn from its ``train``
    items. Without it, test is :func:`group_holdout` ``test_fraction`` of the patients (seed ``seed``), then
    validation :func:`group_holdout` ``val_fraction`` of the patients left (seed ``seed + 1``, so the two draws
    differ). ``unit`` names a patient in the messages (``image`` where each item is its own)."""
    patients_arr = np.asarray([str(p) for p in patients])
    labels_arr = np.asarray(labels)
    if given is None:
        n = len(set(patients_arr.tolist()))
        if n < 3:
            raise ConfigError(
                f"{where} holds {n} {unit}(s); a seeded split needs at least 3 (train, validation and test): "
                f"add {unit}s or give the split"
            )
        out = np.where(group_holdout(patients_arr, labels_arr, test_fraction, seed), "test", "train").astype("<U5")
    else:
        out = np.asarray(given, dtype="<U5")
    if "val" not in out:
        train = np.flatnonzero(out == "train")
        n = len(set(patients_arr[train].tolist()))
        if n < 2:
            raise ConfigError(
                f"{where} leaves {n} training {unit}(s); validation is drawn from them and needs at least 2 "
                f"(train and validation): add {unit}s"
            )
        out[train[group_holdout(patients_arr[train], labels_arr[train], val_fraction, seed + 1)]] = "val"
    return out.tolist()
