"""The documentation's commands stay true to the code: README.md and docs/*.md are checked without running
anything heavy.

From every ```bash block: each `python -m noisy_student ...` command (also the job flags a
`launch/tpu_vm.sh ... -- FLAGS` command passes on) is parsed the way noisy_student/__main__.py parses its
flags: the config file loaded by ml_collections' config_flags (locked), every `--config.key=value` applied
(so the key must exist and the value must parse), every other flag one that __main__.py defines, and
`--workdir` given wherever `--config` is. Commands that use only the digits dataset must run as written
(no placeholders, no gs:// paths). Files the commands name (configs, scripts) exist, `benchmarks/*.py`
commands name existing scripts and options they define, and links between the documents resolve. The
README stays under its size limit, keeps CI's exact test command, and has no lab-notebook leftovers; no
file of the repository points outside it.
"""

import ast
import pathlib
import re
import shlex
import subprocess

import pytest
from absl import flags
from ml_collections import config_flags

from noisy_student import config_defaults

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README] + sorted((ROOT / "docs").glob("*.md"))
README_LIMIT = 14_336
CI_TEST_COMMAND = "python -m pytest -n 2 tests"
OUTSIDE = "../" + "shared"  # split so this file does not contain what it looks for
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist"}
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9_]{2,}\b")  # BUCKET, DIR, OLD_OPS ...
REPO_PATH = re.compile(r"^(?:configs|benchmarks|launch|tests|noisy_student|docs)/[\w./-]*\w$")


def _bash_blocks(path):
  """The text of each ```bash block of a markdown file."""
  return re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", path.read_text(), flags=re.S | re.M)


def _commands(path):
  """(path, command) for each shell command of the file's bash blocks: continuation lines joined,
  comments dropped, `a && b` split in two."""
  found = []
  for block in _bash_blocks(path):
    text = re.sub(r"\\\n\s*", " ", block)
    for line in text.splitlines():
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      found += [(path, part.strip()) for part in line.split("&&") if part.strip()]
  return found


ALL_COMMANDS = [c for doc in DOCS for c in _commands(doc)]


def _words(command):
  """The command's words without leading VAR=value environment settings."""
  words = shlex.split(command)
  while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
    words.pop(0)
  return words


def _cli_flags(words):
  """The flags of a `python -m noisy_student` command, or of a launcher's job (after `--`); None otherwise."""
  if words[:3] == ["python", "-m", "noisy_student"]:
    return words[3:]
  if words and words[0] == "launch/tpu_vm.sh" and "--" in words:
    return words[words.index("--") + 1 :]
  return None


def _main_flag_definitions():
  """(DEFINE function name, flag name) for each flag noisy_student/__main__.py defines, read from its source
  (importing it would define them on absl's global FLAGS)."""
  tree = ast.parse((ROOT / "noisy_student" / "__main__.py").read_text())
  found = []
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Call)
      and isinstance(node.func, ast.Attribute)
      and node.func.attr.startswith("DEFINE_")
      and node.args
      and isinstance(node.args[0], ast.Constant)
    ):
      found.append((node.func.attr, node.args[0].value))
  return found


MAIN_FLAGS = _main_flag_definitions()


def _parse_cli(argv):
  """Parses argv as __main__.py does; returns (config, FlagValues). Raises on any unknown or bad flag."""
  values = flags.FlagValues()
  config = config_flags.DEFINE_config_file(
    "config", str(ROOT / "configs" / "digits.py"), flag_values=values, lock_config=True, sys_argv=argv
  )
  for define, name in MAIN_FLAGS:
    if define == "DEFINE_config_file":
      continue
    default = False if define == "DEFINE_bool" else None
    getattr(flags, define)(name, default, "", flag_values=values)
  values(argv)
  return config.value, values


def _benchmark_source(script):
  """A benchmark script's source with that of the benchmark modules it imports (options may be shared)."""
  source = script.read_text()
  imported = re.findall(
    r"^(?:from benchmarks\.(\w+) import|from benchmarks import (\w+)|import (\w+))", source, flags=re.M
  )
  for name in {n for group in imported for n in group if n}:
    module = script.parent / f"{name}.py"
    if module.is_file() and module != script:
      source += module.read_text()
  return source


def _digits_only(command):
  return "digits" in command and not re.search(r"imagenet|cifar|svhn|gs://", command)


def test_the_documents_have_commands_to_check():
  cli = [c for _, c in ALL_COMMANDS if _cli_flags(_words(c)) is not None]
  assert len(cli) >= 8, cli
  assert any(_digits_only(c) and "--config.mode=label" in c for c in cli)
  assert any(_words(c)[:2] == ["python", "benchmarks/demo.py"] for _, c in ALL_COMMANDS)


@pytest.mark.parametrize("doc,command", ALL_COMMANDS, ids=[f"{d.name}:{c[:60]}" for d, c in ALL_COMMANDS])
def test_command(doc, command, monkeypatch):
  monkeypatch.chdir(ROOT)  # config files and scripts are named relative to the checkout
  words = _words(command)
  where = f"{doc.relative_to(ROOT)}: {command}"
  for word in words:  # files of the repository the command names
    path = word.split("=", 1)[-1].split(":", 1)[0] if word.startswith("--") else word
    if REPO_PATH.match(path) and "*" not in path:
      assert (ROOT / path).exists(), f"{where}: no {path}"
  if words and words[0] == "python" and len(words) > 1 and words[1].startswith("benchmarks/"):
    script = ROOT / words[1]
    assert script.is_file() and script.suffix == ".py", f"{where}: no script {words[1]}"
    source = _benchmark_source(script)
    for option in (w.split("=", 1)[0] for w in words[2:] if w.startswith("--")):
      assert f'"{option}"' in source, f"{where}: {words[1]} defines no {option}"
  if words and words[0] == "launch/tpu_vm.sh":
    assert (ROOT / words[0]).stat().st_mode & 0o111, f"{where}: the launcher is not executable"
  argv = _cli_flags(words)
  if argv is None:
    return
  if _digits_only(command):  # runs as written: nothing to fill in
    assert not PLACEHOLDER.search(command.replace("$PWD", "")), f"{where}: a placeholder in a digits command"
    assert "/tmp/" not in command, f"{where}: a digits command writes to /tmp"
  try:
    config, values = _parse_cli(["noisy_student"] + argv)
  except Exception as e:  # pylint: disable=broad-except
    pytest.fail(f"{where}: the flags do not parse: {type(e).__name__}: {e}")
  if values["config"].present:
    assert values["workdir"].value, f"{where}: --config without --workdir (__main__.py requires it)"
  assert config.mode in config_defaults.MODES, f"{where}: config.mode={config.mode!r}"


def test_readme_size_and_ci_test_command():
  size = len(README.read_bytes())
  assert size <= README_LIMIT, f"README.md is {size} bytes; the limit is {README_LIMIT}"
  readme_commands = [c for doc, c in ALL_COMMANDS if doc == README]
  assert CI_TEST_COMMAND in readme_commands, "README.md lost CI's test command"
  assert any("pip install -e '.[test]'" in c for c in readme_commands)
  ci = ROOT / ".ci" / "run"
  if ci.exists():
    assert CI_TEST_COMMAND in ci.read_text().splitlines(), ".ci/run and README.md run different tests"


def test_no_lab_notebook_leftovers():
  text = README.read_text()
  assert not re.search(r"\bsessions?\b", text, re.I), "README.md mentions a session"
  for doc in DOCS:
    body = doc.read_text()
    where = doc.relative_to(ROOT)
    assert "/tmp/" not in body, f"{where} names a /tmp path"
    assert not re.search(r"\bissue \d", body, re.I), f"{where} cites an issue number"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", body), f"{where} has a dated entry"


def _anchor(heading):
  """GitHub's anchor of a markdown heading."""
  slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return slug.replace(" ", "-")


def test_links_between_documents_resolve():
  for doc in DOCS:
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"^[a-z]+://", target):
        continue
      file, _, anchor = target.partition("#")
      linked = (doc.parent / file).resolve() if file else doc
      assert linked.exists(), f"{doc.relative_to(ROOT)} links to a missing {target}"
      assert str(linked).startswith(str(ROOT)), f"{doc.relative_to(ROOT)} links outside the repository"
      if anchor and linked.suffix == ".md":
        headings = re.findall(r"^#+\s+(.*)$", linked.read_text(), flags=re.M)
        assert anchor in {_anchor(h) for h in headings}, f"{doc.relative_to(ROOT)}: no #{anchor} in {file}"


def _repository_files():
  """Tracked and untracked-but-not-ignored files (git), else every file outside SKIP_DIRS."""
  try:
    listed = subprocess.run(
      ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
      cwd=ROOT,
      capture_output=True,
      check=True,
      timeout=60,
    ).stdout.decode()
    return [ROOT / p for p in listed.split("\0") if p and (ROOT / p).is_file()]
  except (OSError, subprocess.SubprocessError):
    return [p for p in ROOT.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts)]


def test_no_file_points_outside_the_repository():
  offenders = [
    str(p.relative_to(ROOT))
    for p in _repository_files()
    if not SKIP_DIRS & set(p.relative_to(ROOT).parts) and OUTSIDE.encode() in p.read_bytes()
  ]
  assert not offenders, f"files referring to {OUTSIDE}: {offenders}"
