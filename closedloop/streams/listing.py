"""What LSL sees from this machine (``closedloop streams``): each stream's identity, shape
and channel labels, to copy into ``[streams.eeg] name`` and ``[phase] channel``.

Resolving returns each stream's header (name, type, source id, host, channel count, rate,
format) but not its description: the channel labels (``desc/channels/channel/label``, the
convention of amplifier apps and LabRecorder) come only with the full info an inlet
fetches from the outlet, so every stream found is opened once, briefly, for it. A stream
that does not answer in time is listed without labels, and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pylsl

from closedloop.streams.lsl_info import read_labels

__all__ = ["VisibleStream", "describe", "list_streams"]

_FORMATS = {pylsl.cf_float32: "float32", pylsl.cf_double64: "double64",
            pylsl.cf_string: "string", pylsl.cf_int32: "int32", pylsl.cf_int16: "int16",
            pylsl.cf_int8: "int8", pylsl.cf_int64: "int64", pylsl.cf_undefined: "undefined"}


@dataclass(frozen=True, slots=True)
class VisibleStream:
    """One stream as LSL describes it; ``nominal_srate`` 0 is an irregular stream."""

    name: str
    type: str
    source_id: str
    hostname: str
    channel_count: int
    nominal_srate: float
    channel_format: str
    labels: tuple[str, ...]
    described: bool = True  # False: the full info did not come in time (no labels read)

    def as_json(self) -> dict[str, Any]:
        """The fields a script reads (``--json``)."""
        out = asdict(self)
        out["labels"] = list(self.labels)
        del out["described"]
        return out


def _visible(info: pylsl.StreamInfo, *, described: bool) -> VisibleStream:
    return VisibleStream(
        name=info.name(), type=info.type(), source_id=info.source_id(),
        hostname=info.hostname(), channel_count=int(info.channel_count()),
        nominal_srate=float(info.nominal_srate()),
        channel_format=_FORMATS.get(int(info.channel_format()), str(info.channel_format())),
        labels=read_labels(info) if described else (), described=described)


def _full_info(info: pylsl.StreamInfo, timeout_s: float) -> pylsl.StreamInfo | None:
    """The stream's full info (with its description), or None if it does not come."""
    inlet = pylsl.StreamInlet(info, max_buflen=1, recover=False)
    try:
        return inlet.info(timeout=timeout_s)
    except (pylsl.util.TimeoutError, pylsl.util.LostError):
        return None
    finally:
        inlet.close_stream()


def list_streams(*, wait_s: float, name: str | None = None, stype: str | None = None,
                 info_timeout_s: float = 2.0) -> list[VisibleStream]:
    """The streams visible after ``wait_s`` seconds, sorted by name, type and host.

    Args:
        name: Only the streams of this name.
        stype: Only the streams of this type.
        info_timeout_s: How long each stream may take to send its description.
    """
    found = [info for info in pylsl.resolve_streams(wait_time=wait_s)
             if (name is None or info.name() == name) and (stype is None or info.type() == stype)]
    out = []
    for info in found:
        full = _full_info(info, info_timeout_s)
        out.append(_visible(info, described=False) if full is None
                   else _visible(full, described=True))
    return sorted(out, key=lambda s: (s.name, s.type, s.hostname, s.source_id))


def describe(streams: Sequence[VisibleStream]) -> str:
    """The listing as text: a line per stream, its labels on the next."""
    blocks = []
    for s in streams:
        rate = "irregular rate" if s.nominal_srate == 0 else f"{s.nominal_srate:g} Hz"
        plural = "" if s.channel_count == 1 else "s"
        if s.labels:
            labels = " ".join(s.labels)
        elif s.described:
            labels = "(no channel labels in the stream's description)"
        else:
            labels = "(the stream did not send its description in time: labels unknown)"
        blocks.append(f"{s.name}\n  type {s.type}, {s.channel_count} channel{plural}, {rate}, "
                      f"{s.channel_format}; source_id {s.source_id or '(none)'}, host "
                      f"{s.hostname}\n  labels: {labels}")
    return "\n".join(blocks)
