"""What a study measured, as typed results, and their one JSON form.

A study (`equiseg.study`) evaluates each trained run into a `RunResult`, caches it
beside the run (``study.json``), and collects all of them with the tissue model's
`TissueResult` into a `StudyResult` (``results.json``), which is all the study
report (`equiseg.report.study_report`) reads. These types live in ``report/`` because the
report sits below the study.

JSON has no NaN: `to_json` writes NaN as ``null`` and `from_json` reads a ``null``
score back as NaN; nowhere else converts. Scores are ``{name: value}`` as
`evaluate_model` gives them (``dice/mean``, ``mf1``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from equiseg.config import json_text, plain
from equiseg.data.context import ContextKind
from equiseg.evaluation.data_record import NOT_RECORDED, DataRecord
from equiseg.models import ConvFamily

Scores = dict[str, float]

FORMAT = 3
"""The version of the JSON form; a file of another version is not read (a cache is recomputed)."""


ADDED_IN_FORMAT = frozenset({"epoch_budget", "patience", "plan"})
"""Fields added to this format later: a file without them reads them at their defaults (unknown)."""


class ResultFormatError(ValueError):
    """A results file that is not this version's JSON form (e.g. a cache written by an older equiseg)."""


@dataclass(frozen=True)
class TransformScores:
    """Test scores with every test image (and its labels) transformed, see `equiseg.evaluation.robustness`.

    ``d4``: the transform is an element of D4, an exact permutation of the pixels (a model exact
    for D4 scores the same under all of them); else a resampled rotation. ``degrees``: its
    rotation, counter-clockwise as shown; ``flip``: mirrored left-right first.
    """

    name: str
    d4: bool
    flip: bool
    degrees: float
    scores: Scores



@dataclass(frozen=True)
class Certificate:
    """Measured equivariance (`certificate`): ``{"group": ...,
    "rot45": ...}`` relative errors for ``group`` (the family's, D4 for plain models) on the test
    images and, when a Grand Challenge input was given, on the real patch (else None).
    """

    group: str
    test: Scores
    real: Scores | None = None



@dataclass(frozen=True)
class TTAResult:
    """Test scores of a model averaged over D4 at test time, and the seconds the test set took."""

    scores: Scores
    seconds: float



@dataclass(frozen=True)
class Case:
    """One test image kept for the report's case figure: the ``kind`` of case ("best" or "worst"
    by per-image Dice, see `best_and_worst`), which image and its
    Dice. Its pictures are in the run's cases file (`save_cases`).
    """

    kind: str
    index: int
    image_id: str
    dice: float



@dataclass(frozen=True)
class CasePicture:
    """What the case figure draws of one `Case`: the cell image (H, W, 3) uint8, the
    model's probabilities (C, H, W) (stored as float16), its points (N, 4: x, y, class,
    probability) and the true cells (M, 3: x, y, class); px, (x, y) = (column, row).
    """

    image: np.ndarray
    probs: np.ndarray
    points: np.ndarray
    gt: np.ndarray


@dataclass(frozen=True)
class RunResult:
    """One cell of the study matrix (variant, training fraction, seed), evaluated on the test split.

    ``reused``: the run was trained by an earlier invocation. ``seconds``: the test set's
    inference time. ``oracle``: scores with the ground-truth tissue mask as context (context
    variants only, else None). ``tta``: D4 test-time augmentation (plain models only, else
    None). ``cases``: the best and worst test image, kept for the first seed at the full
    fraction (else empty), their pictures in ``run_dir / cases_file``.
    """

    variant: str
    augment: str
    fraction: float
    seed: int
    run_dir: str
    reused: bool
    parameters: int
    family: ConvFamily
    width: int
    context: ContextKind
    scores: Scores
    per_image: tuple[Scores, ...]
    seconds: float
    robustness: tuple[TransformScores, ...]
    certificate: Certificate
    oracle: Scores | None = None
    tta: TTAResult | None = None
    cases: tuple[Case, ...] = ()
    cases_file: str | None = None
    lr: float = math.nan
    train_count: int = 0
    best_epoch: int = -1
    epochs_trained: int = -1
    epoch_budget: int = -1
    patience: int = 0

    @property
    def converged(self) -> bool:
        """Whether the run stopped improving before it was cut off (unknown: True). False when its best epoch was
        its last, however it ended (early stopping follows the validation loss, so a checkpoint chosen by
        validation mF1 can still be rising when the loss stops the run); and, with its epoch budget and
        early-stopping patience (in epochs) recorded, when it ran to the budget with its best epoch within
        the patience of its end (it might have improved further).
        """
        if self.best_epoch < 0:
            return True
        if self.best_epoch >= self.epochs_trained - 1:
            return False
        cut_off = 0 < self.epoch_budget <= self.epochs_trained
        return not (cut_off and self.best_epoch >= self.epochs_trained - max(self.patience, 1))


    def case_pictures(self) -> list[tuple[Case, CasePicture]]:
        """Each kept case with its pictures, read from the cases file."""
        if self.cases_file is None:
            return []
        pictures = load_cases(Path(self.run_dir) / self.cases_file)
        return [(case, pictures[case.kind]) for case in self.cases]


@dataclass(frozen=True)
class TissueResult:
    """The tissue model that gives the context variants their tissue maps, and its test scores."""

    run_dir: str
    family: ConvFamily
    width: int
    parameters: int
    scores: Scores



@dataclass(frozen=True)
class StudyPlan:
    """What a study was sized for (its config's ``plan``): resolve a difference of ``target`` mF1 with
    ``power`` after Holm, given the variance components ``sigma_seed`` and ``sigma_image`` (of a pilot:
    ``source``; `equiseg.evaluation.comparisons.plan`). The report sets the half-width it reached
    beside the one these components expect.
    """

    sigma_seed: float
    sigma_image: float
    target: float = 0.05
    power: float = 0.8
    source: str = ""


@dataclass(frozen=True)
class LRTrial:
    """One run of a study's learning-rate search: a variant at ``lr``, its lowest validation loss
    and that epoch, and whether the variant took this rate.
    """

    variant: str
    lr: float
    val_loss: float
    best_epoch: int
    chosen: bool



@dataclass(frozen=True)
class StudyResult:
    """A whole study: every run's result in matrix order (variant, fraction, seed), the tissue
    model (None without context variants), the dataset's split sizes, the ``minutes`` of the
    invocation that made it, of which ``reused`` runs had been trained before, and the ``data``
    it ran on (``UNKNOWN`` in a results.json written before studies recorded it).
    """

    study: str
    results: tuple[RunResult, ...]
    train_images: int
    test_images: int
    minutes: float
    reused: int
    tissue: TissueResult | None = None
    baseline: str | None = None
    lr_trials: tuple[LRTrial, ...] = ()
    bootstrap: int = 2000
    data: DataRecord = NOT_RECORDED
    plan: StudyPlan | None = None


    def train_count(self, fraction: float) -> int:
        """The number of training images at ``fraction`` (as its runs recorded it)."""
        counts = {r.train_count for r in self.results if r.fraction == fraction}
        return max(counts) if counts else 0

    @property
    def variants(self) -> list[str]:
        """Variant labels in study order."""
        return list(dict.fromkeys(r.variant for r in self.results))

    @property
    def fractions(self) -> list[float]:
        return sorted({r.fraction for r in self.results})

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.results})

    @property
    def full(self) -> float:
        """The largest training fraction, at which robustness, certificate and TTA are compared."""
        return max(self.fractions)

    def runs(self, variant: str, fraction: float) -> list[RunResult]:
        """The runs (one per seed) of ``variant`` at ``fraction``."""
        return [r for r in self.results if r.variant == variant and r.fraction == fraction]


Result = TypeVar("Result", RunResult, TissueResult, StudyResult)


def to_json(result: RunResult | TissueResult | StudyResult) -> str:
    """The JSON form of a result (with its format version); NaN is written as null."""
    return json_text({"format": FORMAT, **plain(result)})


def from_json(kind: type[Result], text: str) -> Result:
    """Read a result of type ``kind`` written by `to_json`; null scores come back as NaN.

    Raises:
        ResultFormatError: ``text`` is not this version's form of ``kind``.
    """
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ResultFormatError(f"format {data.get('format')!r}, not {FORMAT}")
        return _record(kind, data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ResultFormatError(f"not a {kind.__name__} of format {FORMAT}: {error!r}") from error


def save_cases(path: Path, pictures: dict[str, CasePicture]) -> Path:
    """Write the pictures of a run's cases (keyed by case kind) to ``path`` (.npz); probabilities
    as float16, which is plenty for a picture and halves the file.
    """
    arrays = {}
    for kind, picture in pictures.items():
        arrays |= {f"{kind}.image": picture.image, f"{kind}.probs": picture.probs.astype(np.float16),
                   f"{kind}.points": picture.points, f"{kind}.gt": picture.gt}
    np.savez_compressed(path, **arrays)
    return path


def load_cases(path: Path) -> dict[str, CasePicture]:
    """The pictures `save_cases` wrote, keyed by case kind; probabilities as float32."""
    with np.load(path) as data:
        kinds = dict.fromkeys(name.split(".")[0] for name in data.files)
        return {kind: CasePicture(data[f"{kind}.image"], data[f"{kind}.probs"].astype(np.float32),
                                  data[f"{kind}.points"], data[f"{kind}.gt"]) for kind in kinds}


def _record(cls: type, d: dict) -> Any:
    """The result dataclass ``cls`` from its JSON dict, each field read as it is annotated (a key
    missing is an error, except a field whose type reads itself, as `DataRecord` does, and the fields
    of `ADDED_IN_FORMAT`).
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if field.name in ADDED_IN_FORMAT and field.name not in d:
            continue  # a file written before the field was: its default, which says "not recorded"
        values[field.name] = kind.from_dict(d.get(field.name)) if hasattr(kind, "from_dict") else _read(kind, d[field.name])
    return cls(**values)


def _read(kind: Any, value: Any) -> Any:
    """A JSON value as the annotated ``kind``: optional values, tuples, scores (null is NaN),
    nested results, floats (null is NaN), enums and builtins.
    """
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (types.UnionType, typing.Union):  # X | None
        return None if value is None else _read(next(a for a in args if a is not type(None)), value)
    if typing.get_origin(kind) is tuple:
        return tuple(_read(args[0], item) for item in value)
    if typing.get_origin(kind) is dict:
        return _scores(value)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _record(kind, value)
    return _float(value) if kind is float else kind(value)


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _scores(d: dict) -> Scores:
    # counts (tp/BC, ...) stay ints, so that a result reads back exactly as it was written
    return {str(k): v if isinstance(v, int) else _float(v) for k, v in d.items()}
