"""Provenance of the images the service returns: PNG metadata (metadata.py), a signed C2PA manifest
(c2pa_manifest.py, signer certificates for testing in certs.py), an invisible watermark (watermark.py), and
the check of all three (verify.py). The orchestrator applies them through `Provenance` (stamp.py)."""

from __future__ import annotations

import importlib.metadata

try:  # the installed distribution's version (pyproject.toml)
    VERSION = importlib.metadata.version("unclip")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.1.0"

GENERATOR = "unclip"  # the software agent named in the metadata and the C2PA manifest
