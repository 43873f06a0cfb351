"""Recordings read into memory for replay and offline evaluation.

EDF/BDF files are read with pyedflib (a maintained reader of the format). Labels are
normalised the way EEG software usually shows them: ``"EEG C3"`` becomes ``"C3"``, and
a reference suffix such as ``"C3-A1"`` is kept as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from closedloop.errors import ClosedLoopError
from closedloop.extras import require_edf

__all__ = ["MarkerTrack", "Recording", "XdfContent", "load_edf", "load_recording", "load_xdf",
           "normalise_label"]

_TYPE_PREFIXES = ("EEG ", "ECG ", "EMG ", "EOG ")


@dataclass(frozen=True)
class Recording:
    """Samples (n, channels) in physical units, with labels and the sampling rate."""

    data: npt.NDArray[np.float64]
    labels: tuple[str, ...]
    fs: float
    unit: str
    source: str
    name: str = ""
    stype: str = "EEG"
    first_timestamp: float = 0.0

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return float(self.data.shape[0] / self.fs)

    def channel(self, label: str) -> npt.NDArray[np.float64]:
        """One channel's samples by label."""
        return self.data[:, self.labels.index(label)]


def normalise_label(label: str) -> str:
    """``"EEG C3"`` -> ``"C3"``; other labels are only stripped of spaces."""
    label = label.strip()
    for prefix in _TYPE_PREFIXES:
        if label.upper().startswith(prefix):
            return label[len(prefix):].strip()
    return label


def load_edf(path: str | Path) -> Recording:
    """Read every signal of an EDF/BDF file that has the file's most common rate.

    Raises:
        ClosedLoopError: the file cannot be read.
        MissingDependencyError: pyedflib (the extra ``edf``) is not installed.
    """
    require_edf()
    import pyedflib  # noqa: PLC0415 - only needed for EDF

    try:
        reader = pyedflib.EdfReader(str(path))
    except OSError as exc:
        raise ClosedLoopError(f"{path}: cannot read as EDF/BDF: {exc}") from exc
    try:
        rates = reader.getSampleFrequencies()
        values, counts = np.unique(rates, return_counts=True)
        fs = float(values[np.argmax(counts)])
        keep = [i for i, r in enumerate(rates) if float(r) == fs]
        labels = tuple(normalise_label(reader.getLabel(i)) for i in keep)
        data = np.column_stack([reader.readSignal(i) for i in keep]).astype(np.float64)
        unit = reader.getPhysicalDimension(keep[0]) if keep else ""
    finally:
        reader.close()
    return Recording(data=data, labels=labels, fs=fs, unit=unit, source=str(path))


@dataclass(frozen=True)
class MarkerTrack:
    """A marker stream: texts and their timestamps."""

    name: str
    stype: str
    markers: tuple[str, ...]
    timestamps: npt.NDArray[np.float64]


@dataclass(frozen=True)
class XdfContent:
    """The streams of an XDF file: sampled ones and marker ones."""

    regular: tuple[Recording, ...]
    markers: tuple[MarkerTrack, ...]

    def first(self, stype: str = "EEG") -> Recording:
        """The first sampled stream of a type (or the first one at all)."""
        for rec in self.regular:
            if rec.stype.upper() == stype.upper():
                return rec
        if not self.regular:
            raise ClosedLoopError("the XDF file holds no sampled stream")
        return self.regular[0]


def load_xdf(path: str | Path) -> XdfContent:
    """Read an XDF file (LabRecorder's format) with pyxdf.

    Raises:
        ClosedLoopError: the file cannot be read.
    """
    import pyxdf  # noqa: PLC0415 - only needed for XDF

    try:
        streams, _ = pyxdf.load_xdf(str(path))
    except Exception as exc:  # pyxdf raises many kinds; all mean "not readable"
        raise ClosedLoopError(f"{path}: cannot read as XDF: {exc}") from exc
    regular: list[Recording] = []
    markers: list[MarkerTrack] = []
    for s in streams:
        info = s["info"]
        name = info["name"][0]
        stype = info["type"][0]
        ts = np.asarray(s["time_stamps"], dtype=np.float64)
        rate = float(info["nominal_srate"][0])
        if info["channel_format"][0] == "string":
            markers.append(MarkerTrack(name, stype, tuple(str(v[0]) for v in s["time_series"]),
                                       ts))
            continue
        labels: tuple[str, ...] = ()
        desc = info.get("desc") or [None]
        try:
            chans = desc[0]["channels"][0]["channel"]
            labels = tuple(normalise_label(c["label"][0]) for c in chans)
        except (TypeError, KeyError, IndexError):
            pass
        data = np.asarray(s["time_series"], dtype=np.float64)
        if not labels:
            labels = tuple(f"ch{i + 1}" for i in range(data.shape[1]))
        if rate <= 0 and len(ts) > 1:
            rate = float((len(ts) - 1) / (ts[-1] - ts[0]))
        regular.append(Recording(data=data, labels=labels, fs=rate, unit="uV",
                                 source=str(path), name=name, stype=stype,
                                 first_timestamp=float(ts[0]) if len(ts) else 0.0))
    return XdfContent(tuple(regular), tuple(markers))


def load_recording(path: str | Path) -> Recording:
    """EDF/BDF, XDF (its first EEG stream), or NumPy ``.npz`` (``data`` samples x channels,
    ``labels``, ``fs``).

    Raises:
        ClosedLoopError: unknown format or missing fields.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".edf", ".bdf"):
        return load_edf(path)
    if suffix == ".xdf":
        return load_xdf(path).first("EEG")
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                data = np.asarray(z["data"], dtype=np.float64)
                labels = tuple(str(x) for x in z["labels"])
                fs = float(z["fs"])
        except (KeyError, ValueError, OSError) as exc:
            raise ClosedLoopError(f"{path}: a .npz needs 'data' (samples x channels), "
                                  f"'labels' and 'fs': {exc}") from exc
        if data.ndim != 2 or data.shape[1] != len(labels):
            raise ClosedLoopError(f"{path}: 'data' must be samples x {len(labels)} channels")
        return Recording(data=data, labels=labels, fs=fs, unit="uV", source=str(path))
    raise ClosedLoopError(f"{path}: unknown format (EDF, BDF, XDF or .npz)")
