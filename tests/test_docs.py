"""README and docs/: every shell command in them runs as written, and every link and key holds.

Commands come from fenced ``bash`` blocks. Snakemake commands run as a dry run (``-n`` added) in
a scratch copy of the workflow, with the YAML files the same page defines (a ``yaml`` block whose
first line is ``# NAME.yaml``); ``export`` lines set variables for the commands after them;
benchmark scripts, too long to run here, are checked with ``--help`` after the arguments the page
gives. Installing packages, making or activating the virtual environment and running this very
suite are skipped, each with its reason. Any other kind of command fails this test until a rule
for it is added here: a page must not show a command that nothing checks.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PAGE_PATHS = {page.name: page for page in PAGES}
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S
)
# Commands that prepare the environment this suite already runs in.
SETUP = {
    ("python3", "-m", "venv"): "creates the virtual environment this suite already runs in",
    ("python", "-m", "venv"): "creates the virtual environment this suite already runs in",
    ("pip", "install"): "installs packages, done before this suite runs",
    (".",): "activates the virtual environment this suite already runs in",
    ("source",): "activates the virtual environment this suite already runs in",
    ("python", "-m", "pytest"): "the test suite itself",
}


@dataclass
class Command:
    page: str
    line: int
    text: str
    env: dict[str, str] = field(default_factory=dict)  # set by `export` lines before it

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def blocks(page: Path, language: str) -> list[tuple[int, str]]:
    """Fenced blocks of ``language``: (line of the fence, dedented body)."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        if match.group("lang") != language:
            continue
        indent = len(match.group("indent"))
        body = "\n".join(line[indent:] for line in match.group("body").splitlines())
        found.append((text.count("\n", 0, match.start()) + 1, body))
    return found


def commands(page: Path) -> list[Command]:
    """Every command of the page's bash blocks, `a && b` split, continuations joined."""
    found = []
    for fence_line, body in blocks(page, "bash"):
        env: dict[str, str] = {}
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            number, text = fence_line + 1 + i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            for part in re.split(r"\s&&\s", text):
                words = shlex.split(part, comments=True)
                if not words:
                    continue
                if words[0] == "export":
                    for assignment in words[1:]:
                        name, _, value = assignment.partition("=")
                        env[name] = value
                    continue
                found.append(Command(page.name, number, part.strip(), dict(env)))
    return found


ALL_COMMANDS = [c for page in PAGES for c in commands(page)]


def setup_reason(words: list[str]) -> str | None:
    for prefix, reason in SETUP.items():
        if tuple(words[: len(prefix)]) == prefix:
            return reason
    return None


def _page_yaml_files(page: Path, sandbox: Path) -> None:
    """Writes the page's ``# NAME.yaml`` blocks into the sandbox. Folders they name as an
    ``input`` are made there (an absolute one is moved into the sandbox): a dry run only
    needs them to exist."""

    def localise(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "input" and isinstance(value, str):
                    folder = Path(value)
                    if folder.is_absolute():
                        folder = Path("inputs") / folder.name
                    (sandbox / folder).mkdir(parents=True, exist_ok=True)
                    node[key] = folder.as_posix()
                else:
                    localise(value)

    for _, body in blocks(page, "yaml"):
        first = body.splitlines()[0] if body.strip() else ""
        match = re.fullmatch(r"#\s*(\S+\.ya?ml)\s*", first)
        if match:
            data = yaml.safe_load(body)
            localise(data)
            (sandbox / match.group(1)).write_text(yaml.safe_dump(data))


def _sandbox(tmp_path: Path, page: Path) -> Path:
    work = tmp_path / "workflow"
    work.mkdir()
    shutil.copy(REPO / "Snakefile", work / "Snakefile")
    for folder in ("config", "envs", "profiles"):
        if (REPO / folder).is_dir():
            shutil.copytree(REPO / folder, work / folder)
    _page_yaml_files(page, work)
    return work


def _remote_storage(words: list[str], work: Path) -> bool:
    """Whether the command's profile keeps files in a remote store (not reachable here)."""
    if "--profile" not in words:
        return False
    profile = work / words[words.index("--profile") + 1] / "config.yaml"
    return profile.is_file() and "default-storage-provider" in profile.read_text()


def _run(argv: list[str], work: Path, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ) | extra_env
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: f"{c.page}:{c.line}")
def test_every_documented_command_runs_as_written(command, tmp_path):
    words = command.words
    reason = setup_reason(words)
    if reason is not None:
        pytest.skip(f"{command.text!r}: {reason}")
    work = _sandbox(tmp_path, PAGE_PATHS[command.page])
    if words[0] == "snakemake":
        if _remote_storage(words, work):
            pytest.skip(f"{command.text!r}: its profile keeps files in a remote store")
        dry = [] if "-n" in words or "--dry-run" in words else ["-n"]
        proc = _run([sys.executable, "-m", "snakemake", *words[1:], *dry], work, command.env)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{command}\n{output}"
        # A command that names one cohort's files builds that cohort alone.
        asked = {w.split("/")[1] for w in words if w.startswith("results/")}
        if asked:
            built = set(re.findall(r"results/([A-Za-z0-9_-]+)/", output))
            assert built <= asked, f"{command} also builds {sorted(built - asked)}"
    elif words[0] in ("python", "python3") and words[1:3] == ["-m", "monai.bundle"]:
        # Needs a trained model's bundle: tests/test_bundle.py runs this command as written.
        pytest.skip(f"{command.text!r}: run by tests/test_bundle.py on a trained bundle")
    elif words[0] in ("python", "python3") and words[1].startswith("benchmarks/"):
        script = REPO / words[1]
        proc = _run([sys.executable, str(script), *words[2:], "--help"], REPO, command.env)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}{proc.stderr}"
    elif words[0] == "ambient-med":
        extra = [] if "--help" in words or "--version" in words else ["--help"]
        proc = _run([*words, *extra], work, command.env)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}{proc.stderr}"
    else:
        pytest.fail(f"{command}: no rule in tests/test_docs.py checks this kind of command")


def test_no_target_after_configfile():
    """`snakemake --configfile a.yaml train` reads `train` as a second config file."""
    for command in ALL_COMMANDS:
        words = command.words
        if words[0] != "snakemake" or "--configfile" not in words:
            continue
        following = words[words.index("--configfile") + 1 :]
        for word in following:
            if word.startswith("-"):
                break
            assert word.endswith((".yaml", ".yml", ".json")), (
                f"{command}: {word!r} is read as a file"
            )


def test_snakemake_reads_the_target_first_and_the_equals_forms(tmp_path):
    """The forms the docs use work with the pinned Snakemake; the trap form does not."""
    work = _sandbox(tmp_path, REPO / "README.md")
    (work / "small.yaml").write_text("train:\n  steps: 2\n")
    for form in (["train", "--configfile", "small.yaml"], ["--configfile=small.yaml", "train"]):
        proc = _run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *form], work, {})
        assert proc.returncode == 0, f"{form}\n{proc.stdout}{proc.stderr}"
        assert "rule train_model:" in proc.stdout + proc.stderr
    trap = ["--configfile", "small.yaml", "train"]
    proc = _run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *trap], work, {})
    assert proc.returncode != 0


def test_pages_link_only_to_files_that_ship():
    """A user's clone has README.md and docs/, and no ../shared or DESIGN.md."""
    link = re.compile(r"\]\(([^)\s]+)\)")
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, page.name
        for target in link.findall(text):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            resolved = (page.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(REPO), f"{page.name}: {target} leaves the project"
            assert resolved.exists(), f"{page.name}: {target} does not exist"


def _schema_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, sub in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        if "properties" in sub:
            keys += _schema_keys(sub, f"{path}.")
        elif isinstance(sub.get("additionalProperties"), dict):
            keys += _schema_keys(sub["additionalProperties"], f"{path}.<name>.")
        else:
            keys.append(path)
    return keys


def test_every_config_key_is_documented():
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    text = (REPO / "docs" / "config.md").read_text()
    keys = _schema_keys(schema)
    assert len(keys) > 40
    missing = []
    for key in keys:
        if key.startswith("cohorts.<name>."):
            documented = f"| `{key.rsplit('.', 1)[1]}` |" in text
        else:
            documented = f"| `{key}` |" in text
        if not documented:
            missing.append(key)
    assert not missing, f"config keys missing from docs/config.md: {missing}"
