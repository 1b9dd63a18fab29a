"""The README's samples run as written, so they cannot rot.

A sample takes part when an HTML comment, alone on the line right before its
code fence, marks it (GitHub does not show the comment):

- ``<!-- runs -->``: the Python block is run as it is, in a fresh interpreter
  whose current directory is a new temporary directory;
- ``<!-- runs: continued -->``: the same, after the code of the marked block
  before it (so "Using the pool" runs after the ``config`` of "Declaring
  workers", as a reader reads them);
- ``<!-- file: PATH -->``: the block is written to PATH in that directory before
  every run (a worker module or script the samples declare);
- ``<!-- copy of: PATH -->``: the block is the repository's file PATH, as it is
  (the Kubernetes manifest, which tests/test_kubernetes.py checks).

A Python block that is not marked must say so: the paragraph right before it
calls it a fragment (of what), so a reader knows not to paste it as it is.

Samples run as the README says to run those that use the repository's
fixtures ("from the repository's root"): the root is on ``PYTHONPATH``. Each
run has a ``$XDG_RUNTIME_DIR`` of its own, so a named pool of a sample is found
by that sample alone (two runs of the suite side by side do not collide).

A run passes when it exits 0 within its deadline with no traceback on its
stderr (a worker's crash is relayed there), and leaves nothing running: its
pools' processes inherit this test's leak-check token, so ``no_leaks`` finds
any it left.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import subprocess_env

README = Path(__file__).resolve().parent.parent / "README.md"

_MARKED = re.compile(
    r"^<!-- (?P<marker>runs|runs: continued|file: (?P<path>\S+)) -->\n"
    r"```(?P<lang>\w*)\n(?P<code>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)

_PYTHON_FENCE = re.compile(r"^```python\n", re.MULTILINE)

RUN_SECONDS = 45.0


@dataclass(frozen=True)
class Sample:
    """A runnable block: where it starts in the README, and its code (with
    the code it continues)."""

    line: int
    code: str


def _parse(text: str) -> tuple[list[Sample], dict[str, str]]:
    """The runnable samples and the files (path to content) the README marks."""
    samples: list[Sample] = []
    files: dict[str, str] = {}
    for match in _MARKED.finditer(text):
        line = text.count("\n", 0, match.start()) + 2  # the fence's line
        if match["path"] is not None:
            files[match["path"]] = match["code"]
            continue
        assert match["lang"] == "python", f"README.md:{line}: only Python blocks run"
        code = match["code"]
        if match["marker"] == "runs: continued":
            assert samples, f"README.md:{line}: continues no runnable block"
            code = samples[-1].code + "\n" + code
        samples.append(Sample(line, code))
    return samples, files


def _unannounced_fragments(text: str) -> list[int]:
    """The lines of the Python blocks that are neither marked nor introduced,
    in the paragraph before them, as a fragment."""
    lines = []
    for match in _PYTHON_FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n")
        if before.rsplit("\n", 1)[-1].startswith("<!-- "):
            continue
        paragraph = before.rsplit("\n\n", 1)[-1]
        if "fragment" not in paragraph.lower():
            lines.append(text.count("\n", 0, match.start()) + 1)
    return lines


_COPY = re.compile(r"^<!-- copy of: (?P<path>\S+) -->\n```\w*\n(?P<code>.*?)^```$",
                   re.MULTILINE | re.DOTALL)  # fmt: skip

SAMPLES, FILES = _parse(README.read_text())


def test_the_readme_marks_its_samples() -> None:
    """The markers are found (a renamed or mistyped marker would silently
    leave every sample untested), and every declared file is used."""
    assert len(SAMPLES) >= 3, SAMPLES
    assert {"myapp/jobs.py", "myapp/mailer.py"} <= FILES.keys(), FILES.keys()


def test_a_copied_file_is_shown_as_it_is() -> None:
    copies = {m["path"]: m["code"] for m in _COPY.finditer(README.read_text())}
    assert "deploy/kubernetes.yaml" in copies, copies.keys()
    for path, code in copies.items():
        assert code == (README.parent / path).read_text(), f"README's copy of {path} differs"


def test_every_python_block_runs_or_says_it_is_a_fragment() -> None:
    assert _unannounced_fragments(README.read_text()) == []


def test_an_unmarked_block_needs_a_paragraph_calling_it_a_fragment() -> None:
    text = (
        "A fragment of a config:\n\n```python\nx = 1\n```\n\n"
        "Just prose.\n\n```python\ny = 2\n```\n\n"
        "<!-- runs -->\n```python\nz = 3\n```\n"
    )
    assert _unannounced_fragments(text) == [9]


def test_a_continued_block_runs_after_the_one_before() -> None:
    text = (
        "<!-- runs -->\n```python\na = 1\n```\n\nprose\n\n"
        "<!-- runs: continued -->\n```python\nassert a == 1\n```\n"
        "<!-- file: pkg/m.py -->\n```python\nX = 2\n```\n"
        "```python\nnot marked\n```\n"
    )
    samples, files = _parse(text)
    assert [s.code for s in samples] == ["a = 1\n", "a = 1\n\nassert a == 1\n"]
    assert [s.line for s in samples] == [2, 9]
    assert files == {"pkg/m.py": "X = 2\n"}


@pytest.mark.parametrize("sample", SAMPLES, ids=[f"README.md:{s.line}" for s in SAMPLES])
def test_readme_sample_runs_as_written(sample: Sample, tmp_path: Path) -> None:
    for path, content in FILES.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    runtime = tempfile.mkdtemp(prefix="rt-")  # short: AF_UNIX paths are limited
    env = subprocess_env(XDG_RUNTIME_DIR=runtime)
    env.pop("BGPOOL_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", sample.code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_SECONDS,
        )
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    where = f"the sample at README.md:{sample.line}"
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, f"{where} printed a traceback:\n{proc.stderr}"
