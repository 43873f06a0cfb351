"""A writer of XDF, LabRecorder's file format (the documented chunk layout).

Specification: https://github.com/sccn/xdf/wiki/Specifications. A file is the magic
``XDF:`` followed by chunks ``[length-of-length][length][tag][content]``; tags used here:
1 FileHeader, 2 StreamHeader, 3 Samples, 6 StreamFooter. Each chunk is written and flushed
whole, so a file cut short (a killed process, a full disk) is readable up to its last
complete chunk. Files are read back with pyxdf (the reference reader).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO
from xml.sax.saxutils import escape

import numpy as np
import numpy.typing as npt

__all__ = ["XdfWriter"]

_FILE_HEADER, _STREAM_HEADER, _SAMPLES, _CLOCK_OFFSET, _STREAM_FOOTER = 1, 2, 3, 4, 6


def _varlen(n: int) -> bytes:
    if n < 256:
        return struct.pack("<BB", 1, n)
    if n < 2**32:
        return struct.pack("<BI", 4, n)
    return struct.pack("<BQ", 8, n)


class XdfWriter:
    """Streams of float32 samples or string markers into one XDF file."""

    def __init__(self, path: str | Path) -> None:
        self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        try:
            self._fh.write(b"XDF:")
            self._chunk(_FILE_HEADER,
                        b'<?xml version="1.0"?><info><version>1.0</version></info>')
        except BaseException:
            with contextlib.suppress(OSError):
                self._fh.close()  # a full disk: do not leave it to the garbage collector
            raise
        self._streams: dict[int, dict[str, float | int | str]] = {}

    def _chunk(self, tag: int, content: bytes) -> None:
        body = struct.pack("<H", tag) + content
        self._fh.write(_varlen(len(body)) + body)
        self._fh.flush()

    def add_stream(self, stream_id: int, *, name: str, stype: str, labels: Sequence[str],
                   rate_hz: float, fmt: str = "float32", unit: str = "microvolts") -> None:
        """Declare a stream (``fmt`` "float32" or "string")."""
        chans = "".join(f"<channel><label>{escape(lb)}</label><unit>{escape(unit)}</unit>"
                        "</channel>" for lb in labels)
        xml = (f'<?xml version="1.0"?><info><name>{escape(name)}</name><type>{escape(stype)}'
               f"</type><channel_count>{len(labels)}</channel_count><nominal_srate>{rate_hz}"
               f"</nominal_srate><channel_format>{fmt}</channel_format><source_id>"
               f"{escape(name)}</source_id><desc><channels>{chans}</channels></desc></info>")
        self._streams[stream_id] = {"fmt": fmt, "n": 0, "first": float("nan"),
                                    "last": float("nan"), "channels": len(labels)}
        self._chunk(_STREAM_HEADER, struct.pack("<I", stream_id) + xml.encode())

    def write_samples(self, stream_id: int, data: npt.ArrayLike,
                      timestamps: npt.ArrayLike) -> None:
        """Append numeric samples (n, channels) with their timestamps."""
        x = np.asarray(data, dtype="<f4")
        ts = np.asarray(timestamps, dtype="<f8")
        if not len(ts):
            return
        # one packed record per sample: [8][timestamp][values], built without a Python loop
        rec = np.empty(len(ts), dtype=[("tb", "u1"), ("ts", "<f8"),
                                       ("v", "<f4", (x.shape[1],))])
        rec["tb"] = 8
        rec["ts"] = ts
        rec["v"] = x
        self._chunk(_SAMPLES, struct.pack("<I", stream_id) + _varlen(len(ts)) + rec.tobytes())
        self._count(stream_id, ts)

    def write_markers(self, stream_id: int, markers: Sequence[str],
                      timestamps: Sequence[float]) -> None:
        """Append string markers with their timestamps."""
        parts = [struct.pack("<I", stream_id), _varlen(len(markers))]
        for text, t in zip(markers, timestamps, strict=True):
            raw = text.encode()
            parts.append(b"\x08" + struct.pack("<d", float(t)) + _varlen(len(raw)) + raw)
        self._chunk(_SAMPLES, b"".join(parts))
        self._count(stream_id, np.asarray(timestamps, dtype=float))

    def _count(self, stream_id: int, ts: npt.NDArray[np.float64]) -> None:
        s = self._streams[stream_id]
        if len(ts):
            if s["n"] == 0:
                s["first"] = float(ts[0])
                # timestamps are already on this machine's LSL clock: offset 0 (readers
                # such as pyxdf expect clock offsets to segment the stream)
                self._clock_offset(stream_id, float(ts[0]))
            s["last"] = float(ts[-1])
            s["n"] = int(s["n"]) + len(ts)

    def _clock_offset(self, stream_id: int, collection_time: float) -> None:
        self._chunk(_CLOCK_OFFSET, struct.pack("<Idd", stream_id, collection_time, 0.0))

    def close(self) -> None:
        """Write the stream footers and close the file."""
        for sid, s in self._streams.items():
            if int(s["n"]):
                self._clock_offset(sid, float(s["last"]))
            xml = (f'<?xml version="1.0"?><info><first_timestamp>{s["first"]}</first_timestamp>'
                   f"<last_timestamp>{s['last']}</last_timestamp><sample_count>{s['n']}"
                   "</sample_count></info>")
            self._chunk(_STREAM_FOOTER, struct.pack("<I", sid) + xml.encode())
        self._fh.close()
