"""dora_ext.info(): what was built and what this machine can run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_MANIFEST = Path(__file__).resolve().parent / "aot_manifest.json"


def info() -> dict[str, Any]:
    """Build and runtime facts.

    Keys: ``torch_version`` (built against), ``runtime_torch_version``,
    ``triton_version`` (that compiled the cubins), ``cuda_build``, ``archs``
    (compiled sm_XY), ``kernels`` (cubins in the library), ``aot_seconds``
    (AOT step time), and per visible CUDA device: its capability and whether
    the fused tiers can run on it (with the reason when not).
    """
    built = json.loads(torch.ops.dora_ext.build_info.default())
    manifest = json.loads(_MANIFEST.read_text()) if _MANIFEST.is_file() else {}
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            available, reason = torch.ops.dora_ext.fused_available.default(index)
            major, minor = torch.cuda.get_device_capability(index)
            devices.append({
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "capability": f"sm_{major}{minor}",
                "tiers": ["fused_training", "fused_inference", "eager"] if available else ["eager"],
                "reason": reason,
            })
    return {
        **built,
        "runtime_torch_version": torch.__version__,
        "aot_seconds": manifest.get("seconds"),
        "aot_jobs": manifest.get("jobs"),
        "devices": devices,
    }
