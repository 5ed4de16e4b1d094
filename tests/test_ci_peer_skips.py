"""CI fails when a peer test is skipped (issue 11): with DIFFSOLVE_REQUIRE_PEERS=1 (exported by
``.ci/run``) the hooks in tests/conftest.py turn a skip of a ``peers``-marked test, or a
module skipped at import, into exit status 1; other skips stay allowed, and without the
variable nothing changes. Run on a throw-away test directory in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_PEERS_ENV

ROOT = Path(__file__).resolve().parents[1]

CONFTEST = """\
from tests.conftest import (  # noqa: F401
    pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary,
)
"""
PLAIN = """\
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="an ordinary optional skip")
def test_optional():
    pass
"""
PEER_TEST = """\
import pytest

@pytest.mark.peers
@pytest.mark.skipif(True, reason="needs diffusers")
def test_peer():
    pass
"""
PEER_MODULE = """\
import pytest

pytest.importorskip("no_such_peer_package_xyz", reason="needs the peers extra (fake)")
pytestmark = pytest.mark.peers

def test_never_collected():
    pass
"""


def _run(tmp_path: Path, files: dict[str, str], require: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_PEERS_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if require is not None:
        env[REQUIRE_PEERS_ENV] = require
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "files, require, rc",
    [
        ({"test_plain.py": PLAIN}, "1", 0),  # ordinary skips are fine under CI
        ({"test_plain.py": PLAIN, "test_peer.py": PEER_TEST}, None, 0),  # locally: allowed
        ({"test_plain.py": PLAIN, "test_peer.py": PEER_TEST}, "1", 1),
        ({"test_plain.py": PLAIN, "test_peer_mod.py": PEER_MODULE}, "1", 1),
        ({"test_plain.py": PLAIN, "test_peer_mod.py": PEER_MODULE}, "0", 0),
    ],
    ids=["plain-skip-ci", "peer-skip-local", "peer-skip-ci", "peer-module-ci", "peer-module-off"],
)
def test_peer_skips_fail_the_run_under_ci(tmp_path, files, require, rc):
    res = _run(tmp_path, files, require)
    out = res.stdout + res.stderr
    assert res.returncode == rc, out
    assert ("peer tests skipped" in out) == (rc == 1), out
    assert "1 passed" in out, out  # the other tests still ran


def test_ci_script_requires_the_peers():
    text = (ROOT / ".ci" / "run").read_text()
    assert f"export {REQUIRE_PEERS_ENV}=1" in text
