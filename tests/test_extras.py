"""The core runs without the extras; a command that needs one says which to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from closedloop.cli import main
from closedloop.errors import MissingDependencyError
from closedloop.extras import require_edf, require_matplotlib
from closedloop.recording.report import build_report

REPO = Path(__file__).resolve().parent.parent


def _without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import module`` fail as if it were not installed."""
    for name in list(sys.modules):
        if name.split(".")[0] in modules:
            monkeypatch.setitem(sys.modules, name, None)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_no_module_of_the_package_imports_an_extra_when_imported() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['matplotlib'] = None\n"
        "sys.modules['pyedflib'] = None\n"
        "import closedloop\n"
        "for m in pkgutil.walk_packages(closedloop.__path__, 'closedloop.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print('imported')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "imported"


def test_the_extras_are_found_when_installed() -> None:
    require_matplotlib()  # the test extra installs both
    require_edf()


def test_a_report_without_matplotlib_names_the_extra(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _without(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependencyError, match=r"pip install 'closedloop\[report\]'") \
            as info:
        build_report(tmp_path / "events.jsonl")
    assert (info.value.module, info.value.extra) == ("matplotlib", "report")
    assert main(["report", str(tmp_path / "events.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("closedloop: session reports need matplotlib, which is not "
                           "installed: pip install 'closedloop[report]'")


def test_demo_report_and_evaluate_png_refuse_before_they_start(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _without(monkeypatch, "matplotlib")
    report_dir = tmp_path / "report"
    assert main(["demo", "--duration", "60", "--report", str(report_dir)]) == 1
    assert "pip install 'closedloop[report]'" in capsys.readouterr().err
    assert not report_dir.exists()  # nothing started, nothing written
    # the recording does not exist: the missing extra is said first, not after the work
    assert main(["evaluate-phase", str(tmp_path / "rec.npz"), "--png",
                 str(tmp_path / "r.png")]) == 1
    assert "pip install 'closedloop[report]'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["replay"], ["offline"]])
def test_an_edf_recording_without_pyedflib_names_the_extra(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    _without(monkeypatch, "pyedflib")
    assert main([*command, str(tmp_path / "rec.edf")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("closedloop: EDF/BDF recordings need pyedflib, which is not "
                           "installed: pip install 'closedloop[edf]'")
