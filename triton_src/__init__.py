"""Triton kernel sources for dora_ext.

These modules are read only by the ahead-of-time build (``scripts/aot_build.py``);
the installed library never imports Triton.
"""
