"""Every fenced bash and python example of README.md runs, at the small sizes its `# test:` lines state.

The convention (this test reads it; the examples' text runs as written):
- All blocks share one scratch directory: the bash blocks run first, in README order, with
  `bash -e`; then the python blocks (they use what the shell examples wrote: acts/, runs/boost).
- `# test: SUBCOMMAND FLAGS` in a bash block appends FLAGS to every `saeens SUBCOMMAND` of that block
  (argparse keeps the last value of a flag, so they override the example's sizes).
- `# test: ClassName field=value ...` in a python block overrides those fields of every
  saeens.config.ClassName that the block constructs.
- `pip install ...` and `python -m pytest` are left to CI: here they must match what .ci/run runs.
- HOME and XDG_CACHE_HOME point into the scratch directory (where `saeens demo` writes by default).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from saeens import config
from saeens.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELL_PRELUDE = """
saeens() { local extra="README_FLAGS_${1//-/_}"; "$README_PYTHON" -m saeens "$@" ${!extra}; }
pip() { echo "pip $*" >> "$README_CI_LOG"; }
python() {
  if [ "$1 $2" = "-m pytest" ]; then echo "python $*" >> "$README_CI_LOG"; else "$README_PYTHON" "$@"; fi
}
"""
PYTHON_PRELUDE = """
import saeens.config as _config
for _name, _fields in {overrides!r}.items():
    _cls = getattr(_config, _name)
    def _init(self, *args, _orig=_cls.__init__, _fields=_fields, **kw):
        _orig(self, *args, **{{**kw, **_fields}})
    _cls.__init__ = _init
"""


def _blocks() -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block, bash blocks first."""
    text = (ROOT / "README.md").read_text()
    found = [(m.group(1), m.group(2), text[: m.start()].count("\n") + 1) for m in FENCE.finditer(text)]
    return sorted(found, key=lambda b: b[0] != "bash")


def _test_lines(code: str) -> list[str]:
    return [ln.split("# test:", 1)[1].strip() for ln in code.splitlines() if ln.strip().startswith("# test:")]


def _shell_overrides(code: str) -> dict[str, str]:
    out = {}
    for line in _test_lines(code):
        sub, _, flags = line.partition(" ")
        assert sub in COMMANDS and f"saeens {sub}" in code, f"'# test: {line}' names no `saeens {sub}` of its block"
        out[f"README_FLAGS_{sub.replace('-', '_')}"] = flags
    return out


def _python_overrides(code: str) -> dict[str, dict]:
    out = {}
    for line in _test_lines(code):
        name, *pairs = shlex.split(line)
        cls = getattr(config, name, None)
        assert dataclasses.is_dataclass(cls) and f"{name}(" in code, f"'# test: {line}' names no config of its block"
        fields = {k: ast.literal_eval(v) for k, v in (p.split("=", 1) for p in pairs)}
        assert set(fields) <= {f.name for f in dataclasses.fields(cls)}, line
        out[name] = fields
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    env.update(HOME=str(root), XDG_CACHE_HOME=str(root / "cache"), PYTHONPATH=str(ROOT), README_PYTHON=sys.executable,
               README_CI_LOG=str(root / "ci_commands.txt"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return root, env


def test_every_block_is_bash_or_python():
    assert [lang for lang, _, _ in _blocks() if lang not in ("bash", "python")] == []


@pytest.mark.slow  # the demo and the CLI examples load SmolLM2-135M and compile its forward several times
@pytest.mark.parametrize("lang,code,line", _blocks(), ids=[f"{b[0]}-line{b[2]}" for b in _blocks()])
def test_example_runs(scratch, lang, code, line):
    root, env = scratch
    if lang == "bash":
        cmd = ["bash", "-e", "-c", SHELL_PRELUDE + code]
        env = {**env, **_shell_overrides(code)}
    else:
        cmd = [sys.executable, "-c", PYTHON_PRELUDE.format(overrides=_python_overrides(code)) + code]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"README.md line {line} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def test_install_and_test_commands_are_what_ci_runs(scratch):
    """The README's pip and pytest lines (recorded, not run, by the bash blocks) match .ci/run."""
    root, _ = scratch
    log = root / "ci_commands.txt"
    assert log.is_file(), "the bash blocks ran no pip / pytest line (test_example_runs must run first)"
    ci = (ROOT / ".ci" / "run").read_text()
    recorded = log.read_text().splitlines()
    assert any(ln.startswith("python -m pytest") for ln in recorded)
    for ln in recorded:
        if ln.startswith("python -m pytest"):
            assert ln in ci, ln
            continue
        for arg in shlex.split(ln)[2:]:  # after "pip install"
            assert arg.startswith("-") or arg in ci, f"README installs {arg!r}, .ci/run does not: {ln}"
