"""Sphinx configuration for greenworker's docs (built with -W in ./dev test)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import greenworker  # noqa: E402 - after the path is set

project = "greenworker"
author = "the greenworker developers"
copyright = "2026, the greenworker developers"  # noqa: A001 - Sphinx's name
release = greenworker.__version__
version = release
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
exclude_patterns = ["_build"]
