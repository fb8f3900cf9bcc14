"""The repository speaks to its users: README stays short, and no file refers to the environment the project is
developed in (its tools, its shared folders, its issue tracker)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = [
    r"\.\./shared", r"shared/gpu", r"gpu-wheels", r"\.gpu-site", r"fetch-wheels", r"device tool", r"device call",
    r"workplace", r"(?i)\bissue\s*#?\s*\d+", r"(?i)\bissues\s+#?\d+",
]
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


def test_no_file_refers_to_the_development_environment():
    hits = []
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        for pattern in FORBIDDEN:
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{path.relative_to(REPO)}:{line}: {m.group(0)!r}")
    assert not hits, "\n".join(hits)
