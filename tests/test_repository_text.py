"""The repository speaks to its users: README stays short and keeps its two set-up commands, and no tracked file
points at something a user who clones the project and installs it with pip does not have (a path outside the
repository, an issue tracker's numbers, packages installed from a local folder instead of the package index)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    r"(?<![\w.])\.\./": "a path outside the repository",
    r"(?i)\bissues?\s*#\s*\d+": "an issue number",
    r"(?i)\bissues?\s+\d+\b": "an issue number",
    r"--no-index": "an install that bypasses the package index",
}
TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".ini", ".cfg", ".toml", ".txt", ".json", ".sbatch", ""}


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    files = [REPO / f for f in out if (REPO / f).suffix in TEXT_SUFFIXES and (REPO / f).is_file()]
    return [f for f in files if f != Path(__file__).resolve()]


def test_readme_is_short_and_keeps_its_two_set_up_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert test_cmd in readme  # CI runs exactly README's test command
    assert "pip install -e '.[demo]' && python -m nemo_bard.demo" in readme


def test_no_file_points_outside_what_a_user_has():
    hits = []
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        for pattern, what in FORBIDDEN.items():
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{path.relative_to(REPO)}:{line}: {m.group(0)!r} ({what})")
    assert not hits, "\n".join(hits)
