"""Every snippet of the README runs as written against a served demo repository.

The README's ```python blocks run in order in one interpreter (a reader's session: the quick
start defines `client`, later sections use it), and its ```bash blocks one by one, in a child
process, against the demo repository served by a real server. The only change to the text is
the address: the server binds a free port, so `127.0.0.1:8001` (and `localhost:8001`, gRPC) and
`127.0.0.1:9090` (--metrics-port) are replaced by the ports it bound. Not run: the section "The two commands"
(CI runs those literally, `.ci/readme_commands.py`) and a block right after an
`<!-- not run: REASON -->` line (the reason is shown; the quick start may hold none).

The demo repository is the checkout's `demo-repository` (the README's first command builds it)
when it holds every model the snippets name, else those models are built here.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import running_server

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GRPC, METRICS = "127.0.0.1:8001", "127.0.0.1:9090"
SKIPPED_SECTIONS = ("## The two commands",)
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
_NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\s*\Z")


@dataclass(frozen=True)
class Snippet:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    section: str  # the "## " heading it is under
    not_run: str | None  # the reason given in the README, or None: it runs


def snippets(text: str) -> list[Snippet]:
    found = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()]
        headings = re.findall(r"^## .*$", before, flags=re.MULTILINE)
        marker = _NOT_RUN.search(before.rstrip("\n").rsplit("\n", 1)[-1] + "\n")
        found.append(Snippet(m.group(1), m.group(2), before.count("\n") + 1, headings[-1] if headings else "",
                             marker.group(1) if marker else None))
    return found


def runnable(text: str) -> list[Snippet]:
    return [s for s in snippets(text) if s.language in ("python", "bash") and s.not_run is None
            and not s.section.startswith(SKIPPED_SECTIONS)]


# Runs the python snippets (JSON list of [line, code]) in one namespace; names the failing one.
CHILD = """
import json, sys, traceback
namespace = {"__name__": "__main__"}
for line, code in json.loads(sys.stdin.read()):
    print(f"--- README.md line {line}", flush=True)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the snippet at README.md line {line}", flush=True)
        sys.exit(1)
"""


def test_the_snippet_reader_sees_fences_markers_and_sections() -> None:
    text = ("## The two commands\n\n```bash\nmake all\n```\n\n## Quick start\n\n```python\nprint(1)\n```\n\n"
            "<!-- not run: needs certificates -->\n```python\nprint(2)\n```\n\n```text\nsynopsis\n```\n"
            "```bash\necho 3\n```\n")
    every = snippets(text)
    assert [(s.language, s.not_run, s.section) for s in every] == [
        ("bash", None, "## The two commands"), ("python", None, "## Quick start"),
        ("python", "needs certificates", "## Quick start"), ("text", None, "## Quick start"),
        ("bash", None, "## Quick start")]
    assert [s.code for s in runnable(text)] == ["print(1)\n", "echo 3\n"]
    assert every[1].line == 9


def test_the_quick_start_runs_whole_and_names_the_demo_models_only() -> None:
    from medserve.exporters.demo import DEMO_MODELS

    text = README.read_text(encoding="utf-8")
    quick = [s for s in snippets(text) if s.section == "## Quick start"]
    assert [s.not_run for s in quick if s.not_run] == [], "every quick start snippet must run"
    assert sum(s.language == "python" for s in quick) >= 5 and any(s.language == "bash" for s in quick)
    table = text[text.index("## Demo models"):]
    table = table[: table.index("\n## ", 1)]
    first_column = "\n".join(r.split(" | ")[0] for r in table.splitlines() if r.startswith("| `"))
    listed = set(re.findall(r"`([a-z0-9_]+)`", first_column))
    assert listed == set(DEMO_MODELS), "the demo models table lists every demo model, and only those"


def _demo_repository(tmp_path_factory: pytest.TempPathFactory, models: list[str]) -> Path:
    checkout = ROOT / "demo-repository"
    if all((checkout / m).is_dir() and any(p.name.isdigit() for p in (checkout / m).iterdir()) for m in models):
        return checkout
    from medserve.exporters.demo import build_demo_repository

    path = tmp_path_factory.mktemp("demo") / "demo-repository"
    build_demo_repository(path, seed=0, models=models)
    return path


def test_every_readme_snippet_runs_against_the_served_demo(tmp_path_factory: pytest.TempPathFactory) -> None:
    from medserve.clients import Client
    from medserve.exporters.demo import DEMO_MODELS

    text = README.read_text(encoding="utf-8")
    todo = runnable(text)
    named = sorted(m for m in DEMO_MODELS if any(re.search(rf"\b{m}\b", s.code) for s in todo))
    assert named, "the README's snippets call no demo model"
    repository = _demo_repository(tmp_path_factory, named)
    work = tmp_path_factory.mktemp("reader")
    with running_server(repository, metrics_port=0) as server:
        grpc_at, metrics_at = server.target, f"127.0.0.1:{server.server.metrics_port}"

        def local(code: str) -> str:
            code = code.replace(GRPC, grpc_at).replace(METRICS, metrics_at)
            return code.replace(f"localhost:{GRPC.rsplit(':')[1]}", f"localhost:{server.port}")

        python = [[s.line, local(s.code)] for s in todo if s.language == "python"]
        done = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(python), capture_output=True,
                              text=True, cwd=work, timeout=120, check=False)
        print(done.stdout[-6000:], done.stderr[-6000:])
        assert done.returncode == 0, f"a README snippet failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert done.stdout.count("--- README.md line") == len(python)
        for s in (s for s in todo if s.language == "bash"):
            ran = subprocess.run(["bash", "-euo", "pipefail", "-c", local(s.code)], capture_output=True, text=True,
                                 cwd=work, timeout=60, check=False)
            print(f"--- README.md line {s.line} (bash)\n{ran.stdout}{ran.stderr}")
            assert ran.returncode == 0, f"the bash snippet at README.md line {s.line} failed: {ran.stderr[-2000:]}"

        # The demo models table says what ModelMetadata says.
        table = text[text.index("## Demo models"):]
        rows = table[: table.index("\n## ", 1)].splitlines()
        with Client(grpc_at, timeout_s=10) as client:
            for entry in client.repository_index():
                meta = client.model_metadata(entry.name)
                (row,) = [r for r in rows if f"`{entry.name}`" in r.split(" | ")[0]]
                _, _, inputs, outputs = (c.strip() for c in row.strip("| ").split(" | "))
                for cell, tensors in ((inputs, meta.inputs), (outputs, meta.outputs)):
                    for t in tensors:
                        assert f"`{t.name}` {t.datatype} {list(t.shape)}" in cell, (entry.name, t, cell)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_of_the_readmes_resolves() -> None:
    """The README links into perf/README.md's journal by heading: a moved file or a renamed
    heading breaks the link, and this test."""
    broken = []
    for readme in (README, ROOT / "perf" / "README.md"):
        text = readme.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (readme.parent / path).resolve() if path else readme
            if not file.exists():
                broken.append(f"{readme.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), flags=re.MULTILINE)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{readme.name}: {target} (no such heading)")
    assert broken == []
