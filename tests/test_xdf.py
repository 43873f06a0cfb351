"""XDF: our writer, read back with pyxdf, and replayed over LSL with every stream."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pylsl
import pytest

from closedloop.recording.xdf import XdfWriter
from closedloop.replay.recording import load_recording, load_xdf
from closedloop.streams.lsl_info import read_labels
from tests.conftest import unique


def make_xdf(path: Path, eeg: str, marks: str) -> np.ndarray:
    w = XdfWriter(path)
    w.add_stream(1, name=eeg, stype="EEG", labels=["C3", "Cz", "P3"], rate_hz=500.0)
    w.add_stream(2, name=marks, stype="Markers", labels=["marker"], rate_hz=0.0, fmt="string")
    t = 1000.0 + np.arange(1500) / 500.0
    data = np.column_stack([np.arange(1500.0), np.cos(2 * np.pi * 10 * t), -np.arange(1500.0)])
    for i in range(0, 1500, 100):  # in chunks, as a recorder writes them
        w.write_samples(1, data[i:i + 100], t[i:i + 100])
    w.write_markers(2, ["TMS", "TMS"], [1000.5, 1001.5])
    w.close()
    return data


def test_written_xdf_reads_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "rec.xdf"
    data = make_xdf(path, "EEG", "Marks")
    content = load_xdf(path)
    rec = content.first("EEG")
    assert rec.labels == ("C3", "Cz", "P3")
    assert rec.fs == 500.0
    np.testing.assert_allclose(rec.data, data.astype(np.float32), rtol=1e-6)
    (track,) = content.markers
    assert track.markers == ("TMS", "TMS")
    assert load_recording(path).labels == ("C3", "Cz", "P3")


def test_a_truncated_xdf_is_readable_up_to_its_last_chunk(tmp_path: Path) -> None:
    path = tmp_path / "rec.xdf"
    make_xdf(path, "EEG", "Marks")
    raw = path.read_bytes()
    cut = tmp_path / "cut.xdf"
    cut.write_bytes(raw[: len(raw) // 2])  # a killed recorder
    rec = load_xdf(cut).first("EEG")
    assert 100 <= len(rec.data) < 1500
    assert np.all(np.diff(rec.data[:, 0]) == 1)  # what is there is intact and in order


@pytest.mark.lsl
def test_replay_publishes_every_stream_with_its_labels(tmp_path: Path) -> None:
    eeg, marks = unique("xdf-eeg"), unique("xdf-marks")
    path = tmp_path / "rec.xdf"
    make_xdf(path, eeg, marks)
    proc = subprocess.Popen([sys.executable, "-m", "closedloop", "replay", str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "replay_start"
        found = pylsl.resolve_byprop("name", eeg, 1, 5.0)
        assert found
        inlet = pylsl.StreamInlet(found[0])
        assert read_labels(inlet.info()) == ("C3", "Cz", "P3")
        m_found = pylsl.resolve_byprop("name", marks, 1, 5.0)
        assert m_found
        m_inlet = pylsl.StreamInlet(m_found[0])
        m_inlet.open_stream(timeout=5.0)
        values: list[float] = []
        deadline = time.monotonic() + 5
        while len(values) < 400 and time.monotonic() < deadline:
            chunk, _ = inlet.pull_chunk(timeout=0.2)
            values.extend(row[0] for row in chunk)
        assert len(values) >= 400
        assert np.all(np.diff(values) == 1)  # the sample counter: nothing lost or reordered
        sample, _ = m_inlet.pull_sample(timeout=3.0)
        assert sample == ["TMS"]
    finally:
        proc.terminate()
        proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()


def test_replay_argument_errors_are_named(tmp_path: Path) -> None:
    path = tmp_path / "rec.xdf"
    make_xdf(path, "EEG", "Marks")
    bad = subprocess.run([sys.executable, "-m", "closedloop", "replay", str(path), "--streams",
                          "Nope"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert "no stream(s) Nope; it has EEG, Marks" in bad.stderr
    edf = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "eeg" / "eegmat"
    if (edf / "Subject19_1.edf").exists():
        bad = subprocess.run([sys.executable, "-m", "closedloop", "replay",
                              str(edf / "Subject19_1.edf"), "--start", "10", "--stop", "5"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert bad.returncode == 2
        assert "--stop must be after --start" in bad.stderr


@pytest.mark.lsl
def test_replay_at_speed_keeps_the_recordings_time_base() -> None:
    import threading  # noqa: PLC0415

    from closedloop.replay.player import play  # noqa: PLC0415
    from closedloop.replay.recording import Recording  # noqa: PLC0415

    fs = 500.0
    rec = Recording(data=np.arange(2000.0)[:, None], labels=("C3",), fs=fs, unit="uV",
                    source="mem")
    name = unique("speed")
    t0 = pylsl.local_clock() + 1.0
    th = threading.Thread(target=play, kwargs={"rec": rec, "name": name, "t0": t0,
                                               "speed": 4.0}, daemon=True)
    th.start()
    info = pylsl.resolve_byprop("name", name, 1, 5.0)[0]
    inlet = pylsl.StreamInlet(info, max_buflen=10)
    inlet.open_stream(3.0)
    got_v: list[float] = []
    got_t: list[float] = []
    while len(got_v) < 2000 and pylsl.local_clock() < t0 + 6.0:
        data, ts = inlet.pull_chunk(timeout=0.1)
        got_v += [d[0] for d in data]
        got_t += ts
    done_at = pylsl.local_clock()
    th.join(2.0)
    # 4 s of data in about 1 s of wall time, stamped on the recording's own time base
    assert len(got_v) == 2000 and got_v[:3] == [0.0, 1.0, 2.0]
    assert done_at < t0 + 3.5  # in real time it would take 4 s
    assert np.allclose(np.diff(got_t), 1.0 / fs, atol=1e-6)
    assert got_t[-1] - got_t[0] == pytest.approx(1999 / fs, abs=1e-4)
