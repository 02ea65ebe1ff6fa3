#!/usr/bin/env python3
"""Reads compute-sanitizer logs into a verdict per pass (the reporting half of scripts/sanitize.sh).

    python3 scripts/sanitize_report.py summarize LABEL DIR RC SECONDS   # DIR/*.log + DIR/pytest.out -> DIR/result.json
    python3 scripts/sanitize_report.py table OUT LABEL...    # OUT/LABEL/result.json -> OUT/sanitize.{json,md}

``table`` exits 0 when every pass is clean, 3 when the sanitizer cannot run on the machine, else 1.
"""
from __future__ import annotations

import collections
import json
import pathlib
import re
import sys

# "ERROR SUMMARY: 3 errors" (memcheck, initcheck), "RACECHECK SUMMARY: 30 hazards displayed" (racecheck)
_SUMMARY = re.compile(r"(?:ERROR|RACECHECK) SUMMARY:\s+(\d+) (?:error|hazard)")
# memcheck/initcheck name the kernel as "at KERNEL+0x..", racecheck as "Read Thread (..) at KERNEL+0x.."
_KERNEL = re.compile(r"^=+\s+(?:(?:Read|Write) Thread \([\d,]+\) )?at (?:void )?([\w:]+(?:<[^\n(]*>)?)", re.M)
# cuBLAS's own kernels: closed code, not ours to fix (racecheck draws "potential" hazards in some)
_CUBLAS = re.compile(r"(nvjet_|cutlass|sm\d+_xmma|cublas|gemv|gemmk|splitKreduce)")
_HEADLINE = re.compile(r"(Invalid|Program hit|Race|Uninitialized|Unused|Leaked|Error|Saved host backtrace)")


def summarize(label: str, log_dir: pathlib.Path, rc: int, seconds: int) -> dict:
    """One pass's record: report counts (total, per kernel, in dora_ext, outside cuBLAS), the sanitizer's
    own failures, the pytest summary line, the first distinct report headlines and failed tests."""
    errors, summaries, unsupported, internal_error = 0, 0, False, False
    by_kernel: collections.Counter[str] = collections.Counter()
    headlines: list[str] = []
    for log in sorted(log_dir.glob("*.log")):
        text = log.read_text(errors="replace")
        for m in _SUMMARY.finditer(text):
            summaries += 1
            errors += int(m.group(1))
        internal_error |= "Internal Sanitizer Error" in text
        unsupported |= ("Device not supported" in text
                        or "Target application terminated before first instrumented API call" in text)
        for m in _KERNEL.finditer(text):
            by_kernel[m.group(1)[:120]] += 1
        for line in text.splitlines():
            line = line.strip("= ").strip()
            if _HEADLINE.match(line) and line not in headlines:
                headlines.append(line)
    out = (log_dir / "pytest.out").read_text(errors="replace") if (log_dir / "pytest.out").exists() else ""
    tail = [line for line in out.splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", line)]
    # a crash (e.g. racecheck's "Fatal Python error"): the test the faulthandler trace shows
    crash_at = re.findall(r'File ".*?(test_\w+\.py)", line (\d+) in (\w+)', out)
    return {"tool": label, "rc": rc, "seconds": seconds, "errors": errors,
            "errors_in_dora_kernels": sum(n for k, n in by_kernel.items() if k.startswith("dora_")),
            "report_lines": sum(by_kernel.values()),
            "report_lines_outside_cublas": sum(n for k, n in by_kernel.items() if not _CUBLAS.match(k)),
            "processes_with_summary": summaries, "internal_error": internal_error,
            "timed_out": rc in (124, 137), "unsupported": unsupported, "pytest": tail[-1] if tail else "",
            # the first reports travel with the summary: the per-process logs can be too many to
            # bring back from a remote GPU machine
            "first_errors": headlines[:20],
            "failed_tests": [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))][:20],
            "reports_by_kernel": dict(by_kernel.most_common(15)),
            "crash_in": [":".join(c) for c in crash_at[-3:]]}


def verdict(rec: dict) -> tuple[str, int]:
    """(verdict, exit code) of one pass: 0 clean, 1 failed, 3 the sanitizer cannot run here."""
    tests_passed = " passed" in rec["pytest"] and " failed" not in rec["pytest"]
    if rec["unsupported"]:
        return "sanitizer cannot run on this machine", 3
    if rec["internal_error"]:
        return "sanitizer internal error (the tool failed, not the program)", 1
    if rec["timed_out"]:
        return "timed out", 1
    if (rec["tool"].startswith("racecheck") and rec["errors"] and rec["report_lines"]
            and not rec["report_lines_outside_cublas"] and rec["rc"] in (0, 86) and tests_passed):
        # racecheck runs unfiltered (sanitize.sh says why); every report line names a cuBLAS kernel
        return "clean in dora_ext and ATen kernels; every report is inside cuBLAS", 0
    if rec["errors"] or rec["rc"] == 86:
        return "ERRORS REPORTED", 1
    if rec["processes_with_summary"] == 0:
        return "no sanitizer summary found", 1
    if rec["rc"] != 0:
        return f"tests failed (rc {rec['rc']})", 1
    if not tests_passed:
        return "no test ran (no GPU?)", 1
    return "clean", 0


def table(out: pathlib.Path, labels: list[str]) -> int:
    """Writes out/sanitize.json and out/sanitize.md from the passes' records; returns the exit code."""
    recs = [json.loads((out / label / "result.json").read_text()) for label in labels]
    (out / "sanitize.json").write_text(json.dumps(recs, indent=1))
    lines = ["| tool | errors | in dora_ext kernels | processes checked | seconds | pytest | verdict |",
             "|---|---|---|---|---|---|---|"]
    status = 0
    for r in recs:
        text, code = verdict(r)
        status = max(status, code)
        lines.append(f"| {r['tool']} | {r['errors']} | {r['errors_in_dora_kernels']} | {r['processes_with_summary']} "
                     f"| {r['seconds']} | {r['pytest']} | {text} |")
    for r in recs:
        if r["first_errors"] or r["failed_tests"]:
            lines += ["", f"**{r['tool']}**: first distinct reports and failed tests", ""]
            lines += [f"- `{e[:200]}`" for e in r["first_errors"] + r["failed_tests"]]
        if r["reports_by_kernel"]:
            lines += ["", f"**{r['tool']}**: report lines by kernel", ""]
            lines += [f"- {n} in `{k}`" for k, n in r["reports_by_kernel"].items()]
        if r["crash_in"]:
            lines += ["", f"**{r['tool']}**: crashed in " + ", ".join(f"`{c}`" for c in r["crash_in"])]
    (out / "sanitize.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return status


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "summarize":
        label, log_dir = argv[1], pathlib.Path(argv[2])
        rec = summarize(label, log_dir, int(argv[3]), int(argv[4]))
        (log_dir / "result.json").write_text(json.dumps(rec, indent=1))
        print(json.dumps({k: rec[k] for k in ("tool", "rc", "errors", "errors_in_dora_kernels", "pytest")}))
        return 0
    if len(argv) >= 2 and argv[0] == "table":
        return table(pathlib.Path(argv[1]), argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
