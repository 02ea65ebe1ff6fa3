"""Running code in a fresh Python process that imports the very dora_ext this test process imported
(installed or in-place build): for what is once per process (warnings, cold loaders, captures)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 240, ok_codes: tuple[int, ...] = (0,),
             **variables: str) -> str:
    """Runs ``script`` on ``nproc`` CPU processes (``torch.distributed.run --standalone``: a free
    rendezvous port); returns its output; fails on another exit code or a hang (the launcher and its
    workers are killed as a process group). ``variables``: more environment."""
    # CPU processes whatever the host has: on a GPU host FSDP's CPU runs crashed (rank 0 SIGSEGV in
    # gloo, cause not found); the GPU runs are the scripts' own, with NCCL.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **variables}
    env.pop("DORA_EXT_TIER", None)
    # no PYTHONPATH change: the scripts append the checkout themselves, so an installed dora_ext wins
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *args]
    for attempt in range(2):
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"{script.name} did not finish in {timeout} s:\n{out[-4000:]}")
        # gloo's teardown can abort a rank whose peer is still tearing down (seen once, in a CI run on a
        # loaded 2-core machine, after every result was computed): one more run, not a pass
        if proc.returncode in ok_codes or "terminate called without an active exception" not in out or attempt:
            break
    if proc.returncode not in ok_codes:
        pytest.fail(f"{script.name} exited with {proc.returncode}:\n{out[-6000:]}")
    return out
