"""Running code in a fresh Python process that imports the very dora_ext this test process imported
(installed or in-place build): for what is once per process (warnings, cold loaders, captures)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dora_ext

REPO_ROOT = Path(__file__).resolve().parents[1]


def child_env(**variables: str | None) -> dict[str, str]:
    """This process's environment with dora_ext's root first on PYTHONPATH and DORA_EXT_TIER unset;
    ``variables`` set (or, with None, remove) more variables."""
    pkg_root = str(Path(dora_ext.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p))
    env.pop("DORA_EXT_TIER", None)
    for name, value in variables.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_python(args: list[str], timeout: float, **variables: str | None) -> subprocess.CompletedProcess:
    """``python args...`` in a fresh process with :func:`child_env`; output captured as text."""
    return subprocess.run([sys.executable, *args], env=child_env(**variables), capture_output=True, text=True,
                          timeout=timeout)


def interpreted_cases(script: str, timeout: float = 300) -> list:
    """Runs ``script`` under Triton's interpreter (``TRITON_INTERPRET=1``) in a fresh process, with the
    repository root as ``sys.argv[1]`` (to import triton_src); returns the JSON list it prints last."""
    proc = run_python(["-c", script, str(REPO_ROOT)], timeout=timeout, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
