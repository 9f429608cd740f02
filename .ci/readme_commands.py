"""The README's two commands, read from the README itself so CI and the README cannot drift apart.

    python3 .ci/readme_commands.py setup   # the first command: set up, build the demo repository, serve
    python3 .ci/readme_commands.py test    # the second: install the test extras, run the suite

They are the first two ```bash blocks under the heading "## The two commands", one line each.
Standard library only: it runs before any virtual environment exists.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
HEADING = "## The two commands"
WHICH = {"setup": 0, "test": 1}


def commands(text: str) -> list[str]:
    """The one-line bash blocks of the README's "two commands" section, in order."""
    start = text.find(HEADING)
    if start < 0:
        raise SystemExit(f"{README}: no {HEADING!r} section")
    section = text[start + len(HEADING):]
    end = section.find("\n## ")
    section = section if end < 0 else section[:end]
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)]
    if len(blocks) < 2 or any("\n" in b for b in blocks[:2]):
        raise SystemExit(f"{README}: {HEADING!r} must hold two one-line ```bash blocks, found {blocks!r}")
    return blocks[:2]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in WHICH:
        print(f"usage: {Path(__file__).name} {{{'|'.join(WHICH)}}}", file=sys.stderr)
        return 2
    print(commands(README.read_text(encoding="utf-8"))[WHICH[argv[0]]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
