"""Data sets for training and checking: built-in synthetic, the tutorial's random data, `.npz`.

Everything here is numpy only. A `Dataset` is validated when it is made, so every later
stage can trust its shapes and values.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gru_deploy.errors import UserInputError

BUILTIN = ("synthetic", "seed-random", "basicmotions", "japanesevowels")
# Frequency bands (cycles per step) of the synthetic task, one per class.
SYNTHETIC_BANDS = ((0.02, 0.05), (0.07, 0.11), (0.14, 0.19), (0.23, 0.30))
SYNTHETIC_LABELS = ("very-slow", "slow", "fast", "very-fast")


@dataclass(frozen=True)
class Dataset:
    """x float32 [N, T, I], y int64 [N] in [0, len(labels)); optional lengths int [N] in [0, T].

    With `lengths`, x is padded: steps at t >= lengths[n] are ignored (the state is held).
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    labels: tuple[str, ...]
    lengths: np.ndarray | None = None

    def __post_init__(self) -> None:
        validate_arrays(self.x, self.y, len(self.labels), source=self.name)
        if self.lengths is not None:
            validate_lengths(self.lengths, self.x, source=self.name)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_size(self) -> int:
        return int(self.x.shape[2])

    def subset(self, index: np.ndarray, name: str) -> "Dataset":
        lengths = None if self.lengths is None else self.lengths[index]
        return Dataset(name, self.x[index], self.y[index], self.labels, lengths)


@dataclass(frozen=True)
class DataSplit:
    """A training set and the held-out set its accuracy is reported on."""

    train: Dataset
    test: Dataset
    source: str

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "train_samples": len(self.train), "test_samples": len(self.test),
                "seq_len": int(self.train.x.shape[1]), "variable_length": self.train.lengths is not None,
                "input_size": self.train.input_size, "labels": list(self.train.labels)}


def validate_arrays(x: np.ndarray, y: np.ndarray, num_classes: int, source: str) -> None:
    """Raise UserInputError naming what is wrong with a data set's arrays."""
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise UserInputError(f"{source}: x and y must be numpy arrays")
    if x.ndim != 3:
        raise UserInputError(f"{source}: x must have rank 3 [N, T, input_size], got shape {x.shape}")
    if x.dtype != np.float32:
        raise UserInputError(f"{source}: x must be float32, got {x.dtype} (convert with x.astype('float32'))")
    if y.ndim != 1:
        raise UserInputError(f"{source}: y must have rank 1 [N], got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserInputError(f"{source}: y must hold integer class indices, got {y.dtype}")
    if x.shape[0] == 0:
        raise UserInputError(f"{source}: the data set is empty (N=0)")
    if x.shape[0] != y.shape[0]:
        raise UserInputError(f"{source}: x has {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise UserInputError(f"{source}: x has an empty axis, shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0][0])
        raise UserInputError(f"{source}: x holds NaN or inf (first in sample {bad})")
    if y.min() < 0 or y.max() >= num_classes:
        raise UserInputError(f"{source}: labels must lie in [0, {num_classes - 1}], "
                             f"found {int(y.min())}..{int(y.max())}")


def validate_lengths(lengths: np.ndarray, x: np.ndarray, source: str) -> None:
    if not isinstance(lengths, np.ndarray) or lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise UserInputError(f"{source}: lengths must be a 1-D integer array [N]")
    if lengths.shape[0] != x.shape[0]:
        raise UserInputError(f"{source}: lengths has {lengths.shape[0]} entries but x has {x.shape[0]} samples")
    if lengths.min() < 0 or lengths.max() > x.shape[1]:
        raise UserInputError(f"{source}: lengths must lie in [0, {x.shape[1]}] (the padded length), "
                             f"found {int(lengths.min())}..{int(lengths.max())}")


def synthetic(n: int = 2000, seq_len: int = 40, input_size: int = 8, seed: int = 0) -> Dataset:
    """The default task: which frequency band underlies a noisy multi-channel signal.

    Each sample draws a frequency from its class's band; every channel carries that
    frequency with its own amplitude and phase, plus Gaussian noise. Learnable by the
    default model to well over 90% held-out accuracy.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(SYNTHETIC_BANDS), size=n)
    bands = np.asarray(SYNTHETIC_BANDS)
    freq = rng.uniform(bands[y, 0], bands[y, 1])[:, None, None]
    amp = rng.uniform(0.5, 1.5, size=(n, 1, input_size))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, input_size))
    t = np.arange(seq_len)[None, :, None]
    x = amp * np.sin(2 * np.pi * freq * t + phase) + rng.normal(0, 0.3, size=(n, seq_len, input_size))
    return Dataset("synthetic", x.astype(np.float32), y.astype(np.int64), SYNTHETIC_LABELS)


def seed_random(seed: int = 0, input_size: int = 8) -> DataSplit:
    """The tutorial's own run: randn [1000, 10, 8] with random labels of 4 classes, and 100
    fresh test samples. Chance accuracy (25%) is the expected result; kept for fidelity."""
    rng = np.random.default_rng(seed)
    labels = tuple(f"class_{i}" for i in range(4))

    def make(n: int, name: str) -> Dataset:
        x = rng.standard_normal((n, 10, input_size)).astype(np.float32)
        return Dataset(name, x, rng.integers(0, 4, size=n).astype(np.int64), labels)

    return DataSplit(make(1000, "seed-random/train"), make(100, "seed-random/test"), "seed-random")


def load_npz(path: Path) -> Dataset:
    """A user's data: `x` float32 [N, T, I], `y` integer [N], optional `labels` (strings) and
    `lengths` (integer [N]: valid steps of each padded sample)."""
    if not path.is_file():
        raise UserInputError(f"data file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserInputError(f"{path}: holds a single .npy array, not an .npz archive with 'x' and 'y' "
                                 "(save with np.savez(path, x=x, y=y))")
        with loaded as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UserInputError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise UserInputError(f"{path}: missing array(s) {missing}; an .npz needs 'x' [N, T, I] and 'y' [N]")
    x, y = arrays["x"], arrays["y"]
    if "labels" in arrays:
        raw = arrays["labels"]
        if raw.ndim != 1 or raw.dtype.kind not in "US":
            raise UserInputError(f"{path}: 'labels' must be a 1-D array of strings")
        labels = tuple(str(v) for v in raw)
    else:
        if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
            validate_arrays(x, y, 1, source=str(path))  # raises the precise error
        labels = tuple(f"class_{i}" for i in range(int(y.max()) + 1))
    lengths = arrays.get("lengths")
    if lengths is not None and np.issubdtype(lengths.dtype, np.integer):
        lengths = lengths.astype(np.int64, copy=False)
    return Dataset(str(path), x, y, labels, lengths)


def split(data: Dataset, test_fraction: float, seed: int) -> DataSplit:
    """Seeded random split into train and held-out test."""
    if not 0.0 < test_fraction < 1.0:
        raise UserInputError(f"test fraction must be in (0, 1), got {test_fraction}")
    n = len(data)
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_test < 1:
        raise UserInputError(f"{data.name}: {n} sample(s) are too few to hold out a test split")
    order = np.random.default_rng(seed).permutation(n)
    name = data.name
    return DataSplit(data.subset(order[n_test:], f"{name}/train"), data.subset(order[:n_test], f"{name}/test"), name)


def load_data(source: str, seed: int = 0, test_fraction: float = 0.2, input_size: int | None = None,
              test: str | None = None) -> DataSplit:
    """Resolve `--data`: a built-in name, a path to an `.npz`, or a `.ts` file (with `test`, its test split)."""
    if test is not None and not source.endswith(".ts"):
        raise UserInputError("--test goes with a --data PATH_TRAIN.ts file")
    if source in TS_DATASETS:
        return load_builtin_ts(source)
    if source.endswith(".ts"):
        train = load_ts(Path(source))
        if test is not None:
            return _ts_split(train, load_ts(Path(test)), source)
        return split(train, test_fraction, seed)
    if source == "synthetic":
        return split(synthetic(seed=seed, input_size=input_size or 8), test_fraction, seed)
    if source == "seed-random":
        return seed_random(seed=seed, input_size=input_size or 8)
    path = Path(source)
    if path.suffix != ".npz":
        if not path.exists():
            raise UserInputError(f"unknown data set {source!r}: give one of {', '.join(BUILTIN)} "
                                 "or a path to an .npz file")
        raise UserInputError(f"{source}: unsupported data file type {path.suffix!r}; use .npz or .ts")
    data = load_npz(path)
    if input_size is not None and data.input_size != input_size:
        raise UserInputError(f"{source}: x has {data.input_size} input channels but the model takes {input_size}")
    return split(data, test_fraction, seed)


# --- UEA/UCR .ts files ------------------------------------------------------------------------

TS_DATASETS = {"basicmotions": "BasicMotions", "japanesevowels": "JapaneseVowels"}


def load_ts(path: Path) -> Dataset:
    """Read a UEA/UCR `.ts` file (the sktime/aeon text format) into a Dataset.

    Header lines `@problemName`, `@timeStamps`, `@missing`, `@univariate`, `@dimensions`,
    `@equalLength`, `@seriesLength`, `@classLabel true L1 L2 …`, then `@data` and one case a
    line: dimensions separated by `:`, values by `,`, the class label last. Unequal lengths
    are padded with zeros, with `lengths` recording each case's length. Missing values (`?`,
    NaN) are refused with the line number: impute them before training. Every format error
    names its line. Over 60 lines: one pass over the file, header then data, each refusal
    where its line is read.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"data file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path}: not a text .ts file ({exc.reason} at byte {exc.start})") from None
    header: dict[str, str] = {}
    labels: tuple[str, ...] | None = None
    cases: list[tuple[int, list[list[float]], str]] = []
    in_data = False
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        if not in_data:
            if not line.startswith("@"):
                raise UserInputError(f"{where}: expected a @header line or @data before the data")
            tag, _, rest = line[1:].partition(" ")
            tag = tag.lower()
            if tag == "data":
                in_data = True
            elif tag == "classlabel":
                parts = rest.split()
                if not parts or parts[0].lower() != "true" or len(parts) < 2:
                    raise UserInputError(f"{where}: @classLabel must be 'true' followed by the class labels")
                labels = tuple(parts[1:])
            elif tag == "timestamps" and rest.strip().lower() == "true":
                raise UserInputError(f"{where}: time-stamped .ts files are not supported")
            elif tag == "targetlabel" and rest.strip().lower() == "true":
                raise UserInputError(f"{where}: regression (.ts @targetLabel) is not supported; give class labels")
            else:
                header[tag] = rest.strip()
            continue
        if labels is None:
            raise UserInputError(f"{where}: data before any @classLabel line")
        fields = line.split(":")
        label = fields[-1].strip()
        if label not in labels:
            raise UserInputError(f"{where}: class label {label!r} is not one of @classLabel {list(labels)}")
        series: list[list[float]] = []
        for dim, field_text in enumerate(fields[:-1]):
            values = field_text.split(",")
            if any(v.strip() in ("?", "") or v.strip().lower() == "nan" for v in values):
                raise UserInputError(f"{where}: missing value in dimension {dim + 1}; impute missing values "
                                     "before training")
            series.append([])
            for v in values:
                try:
                    series[-1].append(float(v))
                except ValueError:
                    raise UserInputError(f"{where}: {v.strip()!r} in dimension {dim + 1} is not a number") from None
        cases.append((number, series, label))
    if not in_data:
        raise UserInputError(f"{path}: no @data line")
    if not cases:
        raise UserInputError(f"{path}: no cases after @data")
    dims = int(header["dimensions"]) if header.get("dimensions", "").isdigit() else len(cases[0][1])
    equal = header.get("equallength", "true").lower() == "true"
    for number, series, _ in cases:
        if len(series) != dims:
            raise UserInputError(f"{path}:{number}: {len(series)} dimensions, the file declares {dims}")
        if len({len(s) for s in series}) != 1:
            raise UserInputError(f"{path}:{number}: the dimensions of one case differ in length")
    lengths = np.array([len(series[0]) for _, series, _ in cases], np.int64)
    if equal:
        for (number, _, _), length in zip(cases, lengths):
            if length != lengths[0]:
                raise UserInputError(f"{path}:{number}: length {int(length)} differs from the first case's "
                                     f"{int(lengths[0])}, but @equalLength is true")
    x = np.zeros((len(cases), int(lengths.max()), dims), np.float32)
    for i, (_, series, _) in enumerate(cases):
        x[i, : lengths[i]] = np.asarray(series, np.float32).T
    if not np.isfinite(x).all():
        raise UserInputError(f"{path}: values overflow float32")
    y = np.array([labels.index(label) for _, _, label in cases], np.int64)
    return Dataset(str(path), x, y, labels, None if equal else lengths)


def aeon_data_dir() -> Path:
    """The folder of data sets the `aeon` package ships, found without importing aeon (slow)."""
    import importlib.util

    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError("the real data sets come from the aeon package: pip install 'gru-deploy[datasets]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    if not folder.is_dir():
        raise UserInputError(f"the installed aeon has no data folder at {folder}; reinstall gru-deploy[datasets]")
    return folder


def load_builtin_ts(name: str) -> DataSplit:
    """basicmotions or japanesevowels, with the train/test split as shipped."""
    problem = TS_DATASETS[name]
    folder = aeon_data_dir() / problem
    return _ts_split(load_ts(folder / f"{problem}_TRAIN.ts"), load_ts(folder / f"{problem}_TEST.ts"), name)


def _ts_split(train: Dataset, test: Dataset, source: str) -> DataSplit:
    """Pad train and test to one length (lengths mark the real ends) and check they agree."""
    if train.labels != test.labels:
        raise UserInputError(f"{source}: train and test declare different class labels")
    if train.input_size != test.input_size:
        raise UserInputError(f"{source}: train has {train.input_size} dimensions, test {test.input_size}")
    seq = max(train.x.shape[1], test.x.shape[1])
    variable = train.lengths is not None or test.lengths is not None or train.x.shape[1] != test.x.shape[1]

    def pad(d: Dataset, name: str) -> Dataset:
        x = np.zeros((len(d), seq, d.input_size), np.float32)
        x[:, : d.x.shape[1]] = d.x
        lengths = d.lengths if d.lengths is not None else np.full(len(d), d.x.shape[1], np.int64)
        return Dataset(name, x, d.y, d.labels, lengths if variable else None)

    return DataSplit(pad(train, f"{source}/train"), pad(test, f"{source}/test"), source)
