"""pytest plugin: run PEFT's own tests with every LoRA layer they build routed through dora_ext.

Used by ``scripts/peft_suite.sh`` on the test files of PEFT's source release (DESIGN.md §6: a
drop-in is judged by the peer's own tests, unchanged). Load it with ``-p dora_ext_peft_plugin``
(this folder on ``PYTHONPATH``).

How acceleration reaches every model: PEFT creates and extends LoRA layers only through
``LoraLayer.update_layer`` (``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``,
``load_adapter``, ``inject_adapter_in_model``, ``LoraModel(...)`` and mixed models all end there).
The plugin wraps that method so that right after PEFT has built or extended a layer,
``dora_ext.peft.accelerate(layer)`` runs on it. Wrapping the model-level entry points instead
would miss layers created by ``add_adapter`` on an existing model and models built without them.

Options:

``--dora-ext-mode accelerate|stock``
    ``stock`` installs the same counters but routes nothing: the baseline run, under identical
    conditions (same stubs, same offline rule).
``--dora-ext-report PATH``
    JSON with the outcome of every test and, per test, how often dora_ext ops and PEFT's own DoRA
    forward ran. A test that passes without ever reaching dora_ext proves nothing about it; the
    report makes that visible: the terminal summary counts the tests that reached dora_ext ops and
    those that ran PEFT's own DoRA forward.

Tests that need the model hub: runs are offline (``HF_HUB_OFFLINE=1``, set by the script, so
nothing downloads). A test whose failure comes from the hub being offline (huggingface_hub's
``OfflineModeIsEnabled`` / ``LocalEntryNotFoundError`` anywhere in the exception chain) is
reported as skipped with reason ``needs the model hub`` — in both modes, counted separately.

``diffusers`` and ``datasets`` are imported by PEFT's shared test helpers but used only by tests of
other files (Stable Diffusion pipelines, hub datasets). When they are not installed the plugin
puts minimal stand-ins in ``sys.modules`` so the helpers import; a test that actually uses them
fails loudly.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import pytest

_STANDINS: list[str] = []


def _install_standins() -> None:
    """Stand-ins for optional imports of PEFT's test helpers (see the module docstring)."""
    if importlib.util.find_spec("diffusers") is None:
        module = types.ModuleType("diffusers")

        class StableDiffusionPipeline:  # isinstance() checks on it are False, as they should be
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise RuntimeError("dora_ext_peft_plugin: diffusers is not installed (stand-in)")

        module.StableDiffusionPipeline = StableDiffusionPipeline
        sys.modules["diffusers"] = module
        _STANDINS.append("diffusers")
    if importlib.util.find_spec("datasets") is None:
        module = types.ModuleType("datasets")

        def load_dataset(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("dora_ext_peft_plugin: datasets is not installed (stand-in)")

        module.load_dataset = load_dataset
        sys.modules["datasets"] = module
        _STANDINS.append("datasets")


_install_standins()


class _Counters:
    """Per-test counts of the code paths DoRA layers took."""

    KEYS = ("dora_linear", "dora_linear_dropout", "dora_linear_mixed", "compose_delta", "row_norm",
            "peft_dora_linear_forward", "peft_dora_other_forward",
            "peft_forward_on_routed", "layers_routed")

    def __init__(self) -> None:
        self.now: Counter = Counter()
        self.per_test: dict[str, dict[str, Any]] = {}


COUNTERS = _Counters()


def _count(key: str, fn):
    def wrapped(*args: Any, **kwargs: Any):
        COUNTERS.now[key] += 1
        return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    return wrapped


def _install_hooks(mode: str) -> None:
    import dora_ext.peft as dp
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora import variants

    # PEFT's own DoRA math: for Linear layers it runs in stock mode and, accelerated, only for calls
    # a routed layer hands back (or Linear layers we cannot serve); Embedding / Conv DoRA layers
    # are not served by dora_ext and always run it ("other").
    for name, cls in vars(variants).items():
        if (isinstance(cls, type) and issubclass(cls, variants.LoraVariant) and name.startswith(("Dora", "_Dora"))
                and "forward" in vars(cls)):
            key = "peft_dora_linear_forward" if cls is variants.DoraLinearVariant else "peft_dora_other_forward"
            setattr(cls, "forward", staticmethod(_count(key, cls.forward)))
    # dora_ext's ops as dora_ext.peft calls them
    for name in ("dora_linear", "dora_linear_dropout", "dora_linear_mixed", "compose_delta", "row_norm"):
        setattr(dp, name, _count(name, getattr(dp, name)))

    peft_forward = LoraLinear.forward

    def lora_linear_forward(self, *args: Any, **kwargs: Any):
        if type(self) is dp.DoraExtLinear:  # a routed layer handing the call back to PEFT
            COUNTERS.now["peft_forward_on_routed"] += 1
        return peft_forward(self, *args, **kwargs)

    LoraLinear.forward = lora_linear_forward

    if mode != "accelerate":
        return
    update_layer = LoraLayer.update_layer

    def update_layer_then_accelerate(self, *args: Any, **kwargs: Any):
        out = update_layer(self, *args, **kwargs)
        was_routed = dp.is_accelerated(self)
        dp.accelerate(self)
        if dp.is_accelerated(self) and not was_routed:
            COUNTERS.now["layers_routed"] += 1
        return out

    LoraLayer.update_layer = update_layer_then_accelerate


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dora_ext")
    group.addoption("--dora-ext-mode", choices=("accelerate", "stock"), default="accelerate",
                    help="route every PEFT DoRA layer through dora_ext (default) or run stock PEFT")
    group.addoption("--dora-ext-report", default=None, help="write per-test outcomes and path counts (JSON)")


def pytest_configure(config: pytest.Config) -> None:
    mode = config.getoption("--dora-ext-mode")
    _install_hooks(mode)
    config._dora_ext_mode = mode  # type: ignore[attr-defined]


# PEFT tests that assert one of PEFT's own limitations which dora_ext lifts on purpose: accelerated,
# each must fail in exactly that way (strict xfail: if it passed, dora_ext would have the limitation
# again), and it is counted apart from PEFT's other tests.
INTENDED_DEVIATIONS = {
    "test_mixed_adapter_batches_lora_with_dora_raises":
        "PEFT refuses adapter_names with DoRA adapters; dora_ext serves them (README: Serving many adapters)",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--dora-ext-mode") != "accelerate":
        return
    for item in items:
        reason = INTENDED_DEVIATIONS.get(getattr(item, "originalname", item.name))
        if reason is not None:  # "DID NOT RAISE": pytest.raises' own failure, nothing else
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True, raises=pytest.fail.Exception))


def pytest_runtest_setup(item: pytest.Item) -> None:
    COUNTERS.now = Counter()


def _needs_hub(excinfo: Optional[pytest.ExceptionInfo]) -> bool:
    """Whether the failure comes from the model hub being unreachable in offline mode."""
    if excinfo is None:
        return False
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import LocalEntryNotFoundError, OfflineModeIsEnabled  # type: ignore
    seen = set()
    exc: Optional[BaseException] = excinfo.value
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed and os.environ.get("HF_HUB_OFFLINE") == "1" and _needs_hub(call.excinfo):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "needs the model hub (offline run)")
        report.dora_ext_needs_hub = True  # type: ignore[attr-defined]
    entry = COUNTERS.per_test.setdefault(report.nodeid, {"outcome": "passed"})
    if report.when == "call" or report.outcome != "passed":
        if report.outcome != "passed" or entry["outcome"] == "passed":
            entry["outcome"] = ("needs_hub" if getattr(report, "dora_ext_needs_hub", False)
                                else "intended_deviation" if hasattr(report, "wasxfail") else report.outcome)
    if report.when == "teardown":
        entry.update({k: COUNTERS.now.get(k, 0) for k in _Counters.KEYS})


def _summary(config: pytest.Config) -> dict[str, Any]:
    tests = COUNTERS.per_test
    outcomes = Counter(t["outcome"] for t in tests.values())
    on_peft = [n for n, t in tests.items() if t.get("peft_dora_linear_forward")]
    on_peft_other = [n for n, t in tests.items() if t.get("peft_dora_other_forward")]
    reached = [n for n, t in tests.items()
               if any(t.get(k) for k in ("dora_linear", "dora_linear_dropout", "dora_linear_mixed", "compose_delta"))]
    return {
        "mode": config._dora_ext_mode,  # type: ignore[attr-defined]
        "standins": _STANDINS,
        "outcomes": dict(outcomes),
        "tests_reaching_dora_ext_ops": len(reached),
        "tests_running_peft_dora_linear_forward": len(on_peft),
        "tests_running_peft_dora_embedding_or_conv_forward": len(on_peft_other),
        "tests": tests,
    }


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    summary = _summary(config)
    write = terminalreporter.write_line
    write(f"dora_ext PEFT suite, mode={summary['mode']}: {summary['outcomes']}")
    if summary["standins"]:
        write(f"  stand-in modules (not installed): {', '.join(summary['standins'])}")
    write(f"  tests that ran dora_ext ops (dora_linear[_dropout|_mixed] / compose_delta): "
          f"{summary['tests_reaching_dora_ext_ops']}")
    if summary["mode"] == "accelerate":
        write(f"  intended deviations from PEFT (strict xfail): {', '.join(INTENDED_DEVIATIONS)}")
    write("  tests that ran PEFT's own DoRA Linear forward: "
          f"{summary['tests_running_peft_dora_linear_forward']}")
    write("  tests that ran PEFT's own DoRA Embedding/Conv forward (not served by dora_ext): "
          f"{summary['tests_running_peft_dora_embedding_or_conv_forward']}")
    path = config.getoption("--dora-ext-report")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=1, sort_keys=True))
        write(f"  report: {path}")
