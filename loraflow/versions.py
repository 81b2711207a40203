"""The versions block that results.json, run.json and a training run's config.json record: one definition."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import platform

PACKAGES = ("torch", "transformers", "peft", "nevergrad")  # recorded when installed (read from metadata: no import)


def versions() -> dict[str, str]:
    """loraflow, Python, the platform, and every installed package of `PACKAGES`."""
    from loraflow import __version__

    out = {"loraflow": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for package in PACKAGES:
        with contextlib.suppress(md.PackageNotFoundError):
            out[package] = md.version(package)
    return out
