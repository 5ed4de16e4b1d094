"""The README's Python examples run as written (STYLE principle 6)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_readme_pins_torch_in_both_commands():
    text = README.read_text()
    commands = re.findall(r"```bash\n(python3 -m venv.*?)\n```", text, flags=re.S)
    assert len(commands) == 2
    assert all("pip install torch==2.13.0 &&" in c for c in commands)
