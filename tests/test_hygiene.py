"""Project hygiene: the licence the metadata declares, one version everywhere, a changelog."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import diffsolve as ds

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


def _pyproject() -> dict:
    text = (ROOT / "pyproject.toml").read_text()
    if tomllib is not None:
        return tomllib.loads(text)
    version = re.search(r'^version = "([^"]+)"', text, re.M)
    licence = re.search(r'^license = \{ text = "([^"]+)" \}', text, re.M)
    return {"project": {"version": version and version[1], "license": {"text": licence[1]}}}


def test_license_file_is_the_apache_2_text_pyproject_declares():
    project = _pyproject()["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_bytes()
    # the canonical https://www.apache.org/licenses/LICENSE-2.0.txt, unmodified
    assert hashlib.sha256(text).hexdigest() == (
        "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
    )
    assert b"Version 2.0, January 2004" in text and b"END OF TERMS AND CONDITIONS" in text


def test_one_version_everywhere():
    version = _pyproject()["project"]["version"]
    assert ds.__version__ == version
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog")
    assert re.search(rf"^## {re.escape(version)} - \d{{4}}-\d\d-\d\d$", changelog, re.M)
    assert "## Unreleased" in changelog
