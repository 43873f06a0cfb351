"""What closedloop needs to know about an LSL stream, read from its metadata.

Channel labels follow the convention of amplifier apps, LabRecorder and XDF:
``desc/channels/channel/label``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pylsl

from closedloop.errors import ChannelNotFoundError

__all__ = ["StreamSummary", "check_labels", "read_labels", "summarize"]


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """Identity and shape of a resolved stream."""

    name: str
    type: str
    source_id: str
    uid: str
    rate_hz: float
    n_channels: int
    channel_format: int
    labels: tuple[str, ...]


def read_labels(info: pylsl.StreamInfo) -> tuple[str, ...]:
    """Channel labels from ``desc/channels/channel/label`` (empty tuple when absent)."""
    labels: list[str] = []
    ch = info.desc().child("channels").child("channel")
    while not ch.empty():
        labels.append(ch.child_value("label"))
        ch = ch.next_sibling("channel")
    return tuple(labels)


def summarize(info: pylsl.StreamInfo) -> StreamSummary:
    """Summary of a full stream info (as returned by ``StreamInlet.info()``)."""
    return StreamSummary(
        name=info.name(), type=info.type(), source_id=info.source_id(), uid=info.uid(),
        rate_hz=float(info.nominal_srate()), n_channels=int(info.channel_count()),
        channel_format=int(info.channel_format()), labels=read_labels(info))


def check_labels(summary: StreamSummary, required: Mapping[str, Sequence[str]]) -> None:
    """Raise :class:`ChannelNotFoundError` for the first config key whose labels are absent."""
    have = set(summary.labels)
    for key, wanted in required.items():
        missing = [label for label in wanted if label not in have]
        if missing:
            raise ChannelNotFoundError(key=key, stream=summary.name, missing=missing,
                                       available=summary.labels)
