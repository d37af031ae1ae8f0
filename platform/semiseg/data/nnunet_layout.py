"""Which files make up an nnU-Net raw dataset: dataset.json read and checked, and the training
cases found on disk. Reads file names and the JSON only; `semiseg.data.nnunet` reads the voxels.

Two layouts (MIC-DKFZ/nnUNet, documentation/dataset_format.md and convert_msd_dataset.md):

- nnU-Net v2: `channel_names` {"0": "T2", "1": "ADC"}, `labels` {"background": 0, "PZ": 1},
  `file_ending` ".nii.gz"; images `imagesTr/CASE_0000.nii.gz` (one file per channel, the
  4-digit suffix is the channel), labels `labelsTr/CASE.nii.gz`;
- the Medical Segmentation Decathlon (and nnU-Net v1): `modality` {"0": "FLAIR", ...},
  `labels` {"0": "background", "1": "edema"} (index -> name), `training` [{"image":
  "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}], where the image is one 4D file
  holding every modality on its last axis (MSD) or, when that file is absent, one file per
  channel `x_0000.nii.gz` (v1).

`imagesTs/` may be there and is ignored: it has no labels, and semiseg draws its test set from
the labelled cases. Files whose name starts with "." are skipped (the MSD archives ship macOS
"._x.nii.gz" resource forks next to every volume).

Deviations from nnU-Net: only NIfTI (`.nii.gz`, `.nii`) is read; region-based labels, an
`ignore` label and the v2 `dataset` key (explicit file lists) are refused, not supported; a case
in imagesTr without a label is an error (nnU-Net's verify_dataset_integrity refuses it too).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semiseg.errors import DatasetError

ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    id: str
    images: tuple[Path, ...]
    """One file per channel, or a single file holding every channel on a 4th axis (MSD)."""
    label: Path


@dataclass(frozen=True)
class Layout:
    spec: Path
    """The dataset.json, named in every error about what it declares."""
    variant: str
    """"nnunet-v2" or "msd"."""
    channels: list[str]
    classes: list[str]
    """Class names by label value: classes[v] is the class of label v, classes[0] background."""
    cases: list[Case]


def read_layout(root: Path) -> Layout:
    """The dataset.json of `root` and its training cases, every file name checked."""
    spec = root / "dataset.json"
    if not spec.is_file():
        raise DatasetError(f"{root}: no dataset.json; expected an nnU-Net raw dataset folder "
                           "(dataset.json, imagesTr/, labelsTr/) or a Decathlon task folder")
    js = _read_json(spec)
    if "channel_names" in js:
        channels = _by_index(js, "channel_names", spec)
        layout = Layout(spec, "nnunet-v2", channels, _v2_classes(js, spec),
                        _v2_cases(root, js, spec, len(channels)))
    elif "modality" in js:
        channels = _by_index(js, "modality", spec)
        layout = Layout(spec, "msd", channels, _by_index(js, "labels", spec),
                        _msd_cases(root, js, spec, len(channels)))
    else:
        raise DatasetError(f"{spec}: neither 'channel_names' (nnU-Net v2) nor 'modality' "
                           "(Decathlon / nnU-Net v1); expected one of them")
    if len(layout.classes) < 2:
        raise DatasetError(f"{spec}: labels declare only {layout.classes}; expected background "
                           "(0) and at least one class to segment")
    _check_count(js, spec, len(layout.cases))
    return layout


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); "
                           "expected JSON") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column "
                           f"{exc.colno}") from None
    except RecursionError:
        raise DatasetError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object (channel_names, labels, ...), got "
                           f"{type(data).__name__}")
    return data


def _by_index(js: dict[str, Any], key: str, spec: Path) -> list[str]:
    """A {"0": name, "1": name, ...} mapping as the list of names, indices 0..n-1 all present."""
    value = js[key] if key in js else None
    if not isinstance(value, dict) or not value:
        raise DatasetError(f"{spec}: '{key}' is {value!r:.80}; expected a non-empty mapping of "
                           'indices to names, e.g. {"0": "CT"}')
    try:
        indexed = {int(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise DatasetError(f"{spec}: '{key}' has keys {list(value)[:5]}; expected the indices "
                           '"0", "1", ...') from None
    if sorted(indexed) != list(range(len(indexed))):
        raise DatasetError(f"{spec}: '{key}' has indices {sorted(indexed)}; expected 0.."
                           f"{len(indexed) - 1}, each once")
    return [indexed[i] for i in range(len(indexed))]


def _v2_classes(js: dict[str, Any], spec: Path) -> list[str]:
    """v2 `labels` {name: value} as class names by value; values consecutive from 0."""
    labels = js.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{spec}: 'labels' is {labels!r:.80}; expected a mapping of class "
                           'names to label values, e.g. {"background": 0, "liver": 1}')
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DatasetError(f"{spec}: label {name!r} is the region {value}; region-based "
                               "labels are not supported, expected one integer per class")
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(f"{spec}: label {name!r} has value {value!r}; expected an integer")
        if name == "ignore":
            raise DatasetError(f"{spec}: an 'ignore' label ({value}) is not supported; expected "
                               "every label value to be a class")
    by_value = {v: k for k, v in labels.items()}
    if sorted(labels.values()) != list(range(len(labels))):
        raise DatasetError(f"{spec}: label values {sorted(labels.values())}; expected "
                           f"consecutive values 0..{len(labels) - 1} with background 0")
    return [by_value[v] for v in range(len(labels))]


def _v2_cases(root: Path, js: dict[str, Any], spec: Path, num_channels: int) -> list[Case]:
    if "dataset" in js:
        raise DatasetError(f"{spec}: the 'dataset' key (explicit file lists) is not supported; "
                           "expected the files in imagesTr/ and labelsTr/")
    ending = js.get("file_ending")
    if ending not in ENDINGS:
        raise DatasetError(f"{spec}: file_ending {ending!r}; expected one of "
                           f"{', '.join(ENDINGS)} (semiseg reads NIfTI only)")
    images, labels = _folder(root / "imagesTr"), _folder(root / "labelsTr")
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    channels_of: dict[str, set[int]] = {}
    for f in _files(images, ending):
        m = pattern.match(f.name)
        if not m:
            raise DatasetError(f"{f}: not named CASE_XXXX{ending} (the case id, then its "
                               "4-digit channel number)")
        if int(m["channel"]) >= num_channels:
            raise DatasetError(f"{f}: channel {int(m['channel'])}, but {spec} declares "
                               f"{num_channels} channel(s) (0..{num_channels - 1})")
        channels_of.setdefault(m["case"], set()).add(int(m["channel"]))
    ids = [f.name[: -len(ending)] for f in _files(labels, ending)]
    if not ids:
        raise DatasetError(f"{labels}: no label files *{ending}; expected labelsTr/CASE{ending} "
                           "for every training case")
    orphans = sorted(set(channels_of) - set(ids))
    if orphans:
        case = orphans[0]
        raise DatasetError(f"{images / f'{case}_0000{ending}'}: case {case!r} has no label "
                           f"{labels / (case + ending)}; expected one per training case "
                           "(images without labels belong in imagesTs/)")
    cases = []
    for case in ids:
        files = tuple(images / f"{case}_{c:04d}{ending}" for c in range(num_channels))
        for c, f in enumerate(files):
            if c not in channels_of.get(case, set()):
                raise DatasetError(f"{f}: missing channel {c} of case {case!r}; {spec} declares "
                                   f"{num_channels} channel(s), so every case needs "
                                   f"{case}_0000..{case}_{num_channels - 1:04d}{ending}")
        cases.append(Case(case, files, labels / (case + ending)))
    return cases


def _msd_cases(root: Path, js: dict[str, Any], spec: Path, num_channels: int) -> list[Case]:
    training = js.get("training")
    if not isinstance(training, list) or not training:
        raise DatasetError(f"{spec}: 'training' is {training!r:.80}; expected a non-empty list "
                           'of {"image": ..., "label": ...} entries')
    cases: dict[str, Case] = {}
    for n, entry in enumerate(training):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str)
                                                for k in ("image", "label"))):
            raise DatasetError(f"{spec}: training[{n}] is {entry!r:.80}; expected "
                               '{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}')
        image, label = root / entry["image"], root / entry["label"]
        case = _stem(image)
        if case in cases:
            raise DatasetError(f"{spec}: training lists case {case!r} twice; expected each once")
        if not label.is_file():
            raise DatasetError(f"{label}: label file not found (training[{n}] of {spec})")
        cases[case] = Case(case, _msd_images(image, case, n, spec, num_channels), label)
    return list(cases.values())


def _msd_images(image: Path, case: str, n: int, spec: Path, num_channels: int) -> tuple[Path, ...]:
    """The MSD 4D file, or, where only split channels exist (nnU-Net v1), one file per channel."""
    if image.is_file():
        return (image,)
    ending = next(e for e in ENDINGS + ("",) if image.name.endswith(e))
    split = tuple(image.with_name(f"{case}_{c:04d}{ending}") for c in range(num_channels))
    if not split[0].is_file():
        raise DatasetError(f"{image}: image file not found (training[{n}] of {spec}), nor its "
                           f"channel files {split[0].name}, ...")
    for c, f in enumerate(split):
        if not f.is_file():
            raise DatasetError(f"{f}: missing channel {c} of case {case!r}; {spec} declares "
                               f"{num_channels} modalities")
    return split


def _stem(path: Path) -> str:
    name = path.name
    return next((name[: -len(e)] for e in ENDINGS if name.endswith(e)), name)


def _folder(path: Path) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder; an nnU-Net dataset keeps its training cases "
                           "in imagesTr/ and labelsTr/")
    return path


def _files(folder: Path, ending: str) -> list[Path]:
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and f.name.endswith(ending) and not f.name.startswith("."))


def _check_count(js: dict[str, Any], spec: Path, found: int) -> None:
    declared = js.get("numTraining")
    if declared is not None and declared != found:
        raise DatasetError(f"{spec}: numTraining is {declared!r} but {found} training case(s) "
                           "were found; expected them to agree (a case missing or left over?)")
