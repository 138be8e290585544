"""Sphinx configuration: Markdown pages through MyST, warnings are errors (tox -e docs).

Pages generated at build time by _ext/kpf_docs.py (into _generated/, included by the pages):
the configuration reference from kong_pdk_fix/config.py and cli.py, the commands' --help, and
the compatibility matrix from the test results tox leaves in {toxworkdir}/results.
"""

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, os.path.join(DOCS, "_ext"))
# Document the checkout these pages live in, also when sphinx-build runs outside tox.
sys.path.insert(0, ROOT)

import kong_pdk_fix  # noqa: E402

project = "kong-pdk-fix"
author = "kong-pdk-fix contributors"
copyright = "kong-pdk-fix contributors, Apache-2.0"  # noqa: A001 - Sphinx's name
release = version = kong_pdk_fix.__version__

extensions = ["myst_parser", "kpf_docs"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "_data", "_ext", ".gitignore"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "kong-pdk-fix %s" % release
html_theme_options = {
    "description": "kong-pdk's plugin server, fixed in place",
    "fixed_sidebar": True,
}

# No suppress_warnings: the one warning the benchmark pages (written by benchmarks/*.py) raise,
# MyST's "#" to "###" heading jump, is dropped for those pages only by _ext/kpf_docs.py.
