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

__all__ = ["Recording", "load_edf", "normalise_label"]

_TYPE_PREFIXES = ("EEG ", "ECG ", "EMG ", "EOG ")


@dataclass(frozen=True)
class Recording:
    """Samples (n, channels) in physical units, with labels and the sampling rate."""

    data: npt.NDArray[np.float64]
    labels: tuple[str, ...]
    fs: float
    unit: str
    source: str

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
    """
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
