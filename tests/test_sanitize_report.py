"""scripts/sanitize_report.py: the verdicts scripts/sanitize.sh prints, on logs shaped like
compute-sanitizer 2025.3's (the report lines are copied from runs on the H100)."""
from __future__ import annotations

import json
import pathlib

import pytest

from script_loader import load_script

report = load_script("scripts/sanitize_report.py")

CUBLAS_WAR = """========= COMPUTE-SANITIZER
========= Error: Potential WAR hazard detected at __shared__ 0x1028488 in block (1,0,0) :
=========     Read Thread (31,0,0) at nvjet_sm90_tss_64x8_64x16_1x4_h_bz_TNT+0xaf0
=========     Write Thread (256,0,0) at nvjet_sm90_tss_64x8_64x16_1x4_h_bz_TNT+0x2800
=========     Current Value : 2, Incoming Value : 2
"""
DORA_RAW = """========= Error: Race reported between Write access at dora_norm_partials_kernel+0x1a0
=========     Read Thread (3,0,0) at dora_norm_partials_kernel+0x1a0
=========     Write Thread (35,0,0) at dora_norm_partials_kernel+0x2c0
"""
MEMCHECK_OOB = """========= Invalid __global__ read of size 2 bytes
=========     at dora_scale_kernel+0x90
=========     by thread (5,0,0) in block (0,0,0)
"""


def _pass(tmp_path: pathlib.Path, label: str, log: str, summary: str, pytest_line: str, rc: int) -> dict:
    d = tmp_path / label
    d.mkdir()
    (d / "123.log").write_text(log + summary + "\n")
    (d / "pytest.out").write_text("....\n" + pytest_line + "\n")
    rec = report.summarize(label, d, rc, 7)
    (d / "result.json").write_text(json.dumps(rec))
    return rec


def test_racecheck_reports_only_inside_cublas_are_listed_not_failed(tmp_path):
    rec = _pass(tmp_path, "racecheck", CUBLAS_WAR, "========= RACECHECK SUMMARY: 30 hazards displayed (132 errors, 0 "
                "warnings)", "66 passed, 73 deselected in 92.66s", 86)
    assert rec["errors"] == 30 and rec["report_lines"] == 2 and rec["report_lines_outside_cublas"] == 0
    assert rec["reports_by_kernel"] == {"nvjet_sm90_tss_64x8_64x16_1x4_h_bz_TNT": 2}
    assert report.verdict(rec) == ("clean in dora_ext and ATen kernels; every report is inside cuBLAS", 0)
    assert report.table(tmp_path, ["racecheck"]) == 0
    assert "every report is inside cuBLAS" in (tmp_path / "sanitize.md").read_text()


@pytest.mark.parametrize("tool, log, summary", [
    ("racecheck", CUBLAS_WAR + DORA_RAW, "========= RACECHECK SUMMARY: 31 hazards displayed (133 errors, 0 warnings)"),
    ("memcheck", MEMCHECK_OOB, "========= ERROR SUMMARY: 1 error"),
])
def test_a_report_in_our_kernels_fails_the_pass(tmp_path, tool, log, summary):
    rec = _pass(tmp_path, tool, log, summary, "10 passed in 3.0s", 86)
    assert rec["errors_in_dora_kernels"] >= 1
    assert report.verdict(rec) == ("ERRORS REPORTED", 1)
    assert report.table(tmp_path, [tool]) == 1


def test_cublas_reports_fail_memcheck(tmp_path):
    """Only racecheck's "potential" hazards inside cuBLAS are excused: a memcheck report is an error wherever."""
    log = MEMCHECK_OOB.replace("dora_scale_kernel", "nvjet_sm90_tst_64x8_64x16_4x1_v_bz_splitK_TNT")
    rec = _pass(tmp_path, "memcheck", log, "========= ERROR SUMMARY: 1 error", "10 passed in 3.0s", 86)
    assert report.verdict(rec) == ("ERRORS REPORTED", 1)


@pytest.mark.parametrize("log, pytest_line, rc, want", [
    ("========= Internal Sanitizer Error: The Sanitizer failed to handle a hardware exception\n", "Fatal Python error: "
     "Aborted", 1, ("sanitizer internal error (the tool failed, not the program)", 1)),
    ("", "10 passed in 3.0s", 124, ("timed out", 1)),
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", "1 failed, 9 passed in 3.0s", 1,
     ("tests failed (rc 1)", 1)),
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", "139 deselected in 1.0s", 0,
     ("no test ran (no GPU?)", 1)),
    ("", "10 passed in 3.0s", 0, ("no sanitizer summary found", 1)),
    ("========= Error: Device not supported\n", "", 0, ("sanitizer cannot run on this machine", 3)),
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", "10 passed in 3.0s", 0,
     ("clean", 0)),
])
def test_verdicts(tmp_path, log, pytest_line, rc, want):
    rec = _pass(tmp_path, "racecheck", log, "", pytest_line, rc)
    assert report.verdict(rec) == want


def test_cublas_reports_with_a_failed_test_still_fail(tmp_path):
    rec = _pass(tmp_path, "racecheck", CUBLAS_WAR, "========= RACECHECK SUMMARY: 1 hazards displayed (4 errors, 0 "
                "warnings)", "1 failed, 65 passed in 92.66s", 86)
    assert report.verdict(rec)[1] == 1
