#!/usr/bin/env python3
"""Mutation testing of the safety gate (mutmut), JSON out. A tool run by hand, not in CI.

The gate is the only path to a pulse, so its tests must fail when its code is wrong. This
runs mutmut (``pip install -e .[mutation]``) over ``closedloop/stim/rules.py``,
``closedloop/stim/safety.py`` and ``closedloop/stim/gated.py`` with the gate's fast tests
(no LSL, no serial port): the ones in ``[tool.mutmut]`` of ``pyproject.toml``, plus the
property and oracle tests (``test_gate_property.py``, ``test_safety_oracle.py``) when they
exist and pass in the copy before the run (``--extra-tests never`` leaves them out: they
are slower).

Everything happens in a temporary copy of ``closedloop/``, ``tests/`` and
``pyproject.toml``, deleted afterwards (``--keep`` keeps it, to look at a mutant with
``mutmut show NAME`` there), so the repository gets no ``mutants/`` folder.

The JSON has, per file, the mutants' total and how many were killed, survived, timed out
or were covered by no test, and the score: (killed + timeout) / total, a mutant that no
test runs counting as a survivor. Then every survivor (and every mutant that no test
runs) with its file, line, function, the source line and the mutated line.

What mutmut 3 does not mutate, so this run says nothing about it: module-level constants
(the Table 4 transcription, ``BURST_GAP_S`` and the other limits), dataclass fields and
their defaults, and decorated functions (``Trigger.last``, ``Trigger.burst`` and the
properties of the gate). They are read by the mutated functions, so the tests exercise
them, but no mutant of them is tried.

Usage: ``python tools/mutation.py [--jobs 2] [--extra-tests auto|never] [--keep]
[--fail-under 90]``. On 2 cores a full run (about 1100 mutants) took 15 min with the
property and oracle tests, 5.5 min with the fast tests alone (``--extra-tests never``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parent.parent
EXTRA_TESTS = ("tests/test_gate_property.py", "tests/test_safety_oracle.py")
_STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
           34: "skipped", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
           255: "timeout", 37: "caught by type check"}
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis",
                                 "mutants")


@dataclass(frozen=True, slots=True)
class Survivor:
    """A mutant that no test killed."""

    file: str
    line: int | None
    function: str
    mutant: str
    status: str  # "survived" or "no tests"
    source: str  # the original line
    mutated: str  # what mutmut made of it


def _copy(work: Path) -> None:
    shutil.copytree(REPO / "closedloop", work / "closedloop", ignore=_IGNORE)
    shutil.copytree(REPO / "tests", work / "tests", ignore=_IGNORE)
    shutil.copytree(REPO / "tools", work / "tools", ignore=_IGNORE)  # the emulators
    shutil.copy2(REPO / "pyproject.toml", work / "pyproject.toml")


def _config(work: Path) -> dict[str, Any]:
    data = tomllib.loads((work / "pyproject.toml").read_text("utf-8"))
    cfg: dict[str, Any] = data["tool"]["mutmut"]
    return cfg


def _select_tests(work: Path, extra: str, extra_timeout_s: float,
                  log: list[str]) -> list[str]:
    """The configured tests that exist, plus the extra ones that pass; write them back."""
    data = tomllib.loads((work / "pyproject.toml").read_text("utf-8"))
    cfg = data["tool"]["mutmut"]
    tests = [t for t in cfg["pytest_add_cli_args_test_selection"] if (work / t).exists()]
    for t in EXTRA_TESTS:
        if extra == "never" or t in tests:
            continue
        if not (work / t).exists():
            log.append(f"{t}: absent, left out")
            continue
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n", "0", t]
        try:
            done = subprocess.run(cmd, cwd=work, capture_output=True, text=True,
                                  timeout=extra_timeout_s, check=False)
        except subprocess.TimeoutExpired:
            log.append(f"{t}: longer than {extra_timeout_s:g} s, left out")
            continue
        if done.returncode == 0:
            tests.append(t)
            log.append(f"{t}: passes, included")
        else:
            tail = done.stdout.strip().splitlines()[-1:] or ["?"]
            log.append(f"{t}: does not pass ({tail[0]}), left out")
    cfg["pytest_add_cli_args_test_selection"] = tests
    (work / "pyproject.toml").write_text(tomli_w.dumps(data), "utf-8")
    return tests


def _def_lines(source: str) -> dict[str, int]:
    """Line of each function's ``def``, keyed ``name`` or ``Class.name``."""
    out: dict[str, int] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node.lineno
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef):
                    out[f"{node.name}.{sub.name}"] = sub.lineno
    return out


def _function_of(mutant: str) -> str:
    """``closedloop.stim.safety.xǁSafetyGateǁcommit__mutmut_3`` -> ``SafetyGate.commit``."""
    tail = mutant.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]
    if tail.startswith("xǁ"):
        cls, name = tail[2:].split("ǁ", 1)
        return f"{cls}.{name}"
    return tail.removeprefix("x_")


def _locate(diff: str, def_line: int | None, source_lines: list[str]
            ) -> tuple[int | None, str, str]:
    """The file line of a mutant's first change, the original and the mutated text.

    The diff is of the function alone, its first line the ``def`` at ``def_line``.
    """
    orig: list[str] = []
    new: list[str] = []
    first: int | None = None
    pos: int | None = None  # line in the function of the next original line
    for line in diff.splitlines():
        if line.startswith("@@"):
            pos = int(line.split()[1].lstrip("-").split(",")[0])
            continue
        if pos is None:  # the --- / +++ header
            continue
        if line.startswith("+"):
            new.append(line[1:])
            first = pos if first is None else first
            continue
        if line.startswith("-"):
            orig.append(line[1:])
            first = pos if first is None else first
        pos += 1
    text_orig = " ".join(s.strip() for s in orig)
    text_new = " ".join(s.strip() for s in new)
    if def_line is None or first is None:
        return None, text_orig, text_new
    line_no: int | None = def_line + first - 1
    want = orig[0].strip() if orig else None
    guess = def_line + first - 1
    if want is not None and not (0 < guess <= len(source_lines)
                                 and source_lines[guess - 1].strip() == want):
        # not where the diff says (should not happen): the nearest line with that text
        near = [i + 1 for i, s in enumerate(source_lines) if s.strip() == want]
        line_no = min(near, key=lambda i: abs(i - guess)) if near else None
    return line_no, text_orig, text_new


def _diff_of(mutant: str, path: Path) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant  # noqa: PLC0415

    diff: str = get_diff_for_mutant(mutant, path=path)
    return diff


def _collect(work: Path, files: list[str]) -> tuple[dict[str, dict[str, Any]],
                                                     list[Survivor]]:
    per_file: dict[str, dict[str, Any]] = {}
    survivors: list[Survivor] = []
    old = Path.cwd()
    os.chdir(work)  # mutmut's own reader works from the copy
    try:
        for f in files:
            meta = work / "mutants" / (f + ".meta")
            codes: dict[str, int | None] = (
                json.loads(meta.read_text("utf-8"))["exit_code_by_key"] if meta.exists()
                else {})
            status = {k: _STATUS.get(v, "suspicious") if v is not None else "not checked"
                      for k, v in codes.items()}
            n = Counter(status.values())
            total = len(status)
            caught = n["killed"] + n["timeout"]
            per_file[f] = {"total": total, "killed": n["killed"], "survived": n["survived"],
                           "timeout": n["timeout"], "no_tests": n["no tests"],
                           "other": total - caught - n["survived"] - n["no tests"],
                           "score": round(100.0 * caught / total, 1) if total else None}
            source = (work / f).read_text("utf-8")  # as copied, not as edited since
            defs = _def_lines(source)
            lines = source.splitlines()
            for name in sorted(status, key=_mutant_order):
                if status[name] not in ("survived", "no tests"):
                    continue
                func = _function_of(name)
                try:
                    diff = _diff_of(name, Path(f))
                except Exception as exc:
                    survivors.append(Survivor(f, None, func, name, status[name], "",
                                              f"(no diff: {exc})"))
                    continue
                line, orig, new = _locate(diff, defs.get(func), lines)
                survivors.append(Survivor(f, line, func, name, status[name], orig, new))
    finally:
        os.chdir(old)
    return per_file, survivors


def _mutant_order(name: str) -> tuple[str, int]:
    base, _, k = name.rpartition("__mutmut_")
    return base, int(k) if k.isdigit() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                    help="mutants tested at once (default: the number of cores)")
    ap.add_argument("--extra-tests", choices=("auto", "never"), default="auto",
                    help="add the property and oracle tests when they pass (auto)")
    ap.add_argument("--extra-timeout", type=float, default=300.0,
                    help="seconds the extra tests may take in the pre-check")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work copy (its path is in the JSON) for `mutmut show`")
    ap.add_argument("--fail-under", type=float, default=None,
                    help="exit 1 when the overall score is below this percentage")
    args = ap.parse_args()

    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="closedloop-mutation-"))
    notes: list[str] = []
    try:
        _copy(work)
        files = list(_config(work)["only_mutate"])
        tests = _select_tests(work, args.extra_tests, args.extra_timeout, notes)
        t_run = time.monotonic()
        log_path = work / "mutmut.log"
        with log_path.open("w") as log:
            done = subprocess.run([sys.executable, "-m", "mutmut", "run",
                                   "--max-children", str(args.jobs)],
                                  cwd=work, stdout=log, stderr=subprocess.STDOUT, check=False)
        run_s = time.monotonic() - t_run
        if done.returncode != 0:
            tail = log_path.read_text("utf-8", errors="replace")[-3000:]
            print(json.dumps({"error": f"mutmut run exited {done.returncode}",
                              "log_tail": tail, "work": str(work)}, indent=2))
            args.keep = True
            sys.exit(2)
        per_file, survivors = _collect(work, files)
        total = {k: sum(v[k] for v in per_file.values())
                 for k in ("total", "killed", "survived", "timeout", "no_tests", "other")}
        caught = total["killed"] + total["timeout"]
        score = round(100.0 * caught / total["total"], 1) if total["total"] else None
        total["score"] = score
        out = {"tool": f"mutmut {version('mutmut')}", "python": sys.version.split()[0],
               "jobs": args.jobs, "tests": tests, "notes": notes,
               "seconds": {"mutmut_run": round(run_s, 1),
                           "all": round(time.monotonic() - t0, 1)},
               "files": per_file, "total": total,
               "survivors": [asdict(s) for s in survivors]}
        if args.keep:
            out["work"] = str(work)
        print(json.dumps(out, indent=2, ensure_ascii=False))
        if args.fail_under is not None and (score or 0.0) < args.fail_under:
            sys.exit(1)
    finally:
        if not args.keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)


if __name__ == "__main__":
    main()
