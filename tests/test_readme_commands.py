"""The commands in the READMEs run as written: no documented tool, flag or config field rots.

Every `tools/<name>.py` command in a fenced block or inline code span of README.md and
cav_mae_jax/data/README.md is checked: the tool exists, every `--flag` it passes is one the tool
defines (its own --help), and every `--config.<field>` override names a field of the config the
command chooses. Commands that need no data of the user's run for real (the model summaries,
whose output the README quotes).
"""

import functools
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

from cav_mae_jax.train import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "cav_mae_jax/data/README.md")
ARGPARSE_TOOLS = ("preprocess", "inspect_records", "make_synthetic", "benchmark_preprocess")


def _commands(doc):
  """(tool name, argument tokens, trailing comment) of every tool command in a markdown file."""
  text = open(os.path.join(ROOT, doc)).read()
  spans = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]*tools/[^`\n]*)`",
                                                                   text)
  commands = []
  for span in spans:
    for line in span.replace("\\\n", " ").splitlines():
      match = re.search(r"tools/(\w+)\.py(.*)", line)
      if not match:
        continue
      args, _, comment = match.group(2).partition("#")
      args = re.sub(r"[\[\]\"]", " ", args)  # [--optional ...] and shell quotes
      commands.append((match.group(1), shlex.split(args), comment.strip()))
  return commands


COMMANDS = [(doc, *command) for doc in DOCS for command in _commands(doc)]


@functools.lru_cache(maxsize=None)
def _help(tool):
  flag = "--help" if tool in ARGPARSE_TOOLS else "--helpfull"
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{tool}.py"), flag],
                          capture_output=True, text=True, timeout=300, check=False)
  return result.stdout + result.stderr


def _config_fields(value):
  path, _, arg = value.partition(":")
  module = importlib.import_module("configs." + os.path.splitext(os.path.basename(path))[0])
  return set(run_config.flatten(module.get_config(arg)))


def test_readmes_document_commands():
  tools = {tool for _, tool, _, _ in COMMANDS}
  assert {"train", "evaluate", "convert", "preprocess", "average", "model_summary"} <= tools


@pytest.mark.parametrize("doc, tool, args, comment", COMMANDS,
                         ids=[f"{c[0]}:{c[1]}:{i}" for i, c in enumerate(COMMANDS)])
def test_documented_command_uses_real_flags_and_fields(doc, tool, args, comment):
  assert os.path.isfile(os.path.join(ROOT, "tools", f"{tool}.py")), f"{doc}: tools/{tool}.py"
  help_text = _help(tool)
  config = next((a.split("=", 1)[1] if "=" in a else args[i + 1]
                 for i, a in enumerate(args) if a.split("=")[0] == "--config"), None)
  fields = _config_fields(config) if config and config.startswith("configs/") else set()
  if config is None and any(a.split("=")[0] == "--workdir" for a in args) and tool != "train":
    # The run's recorded config (configs/workdir.py): the fields of some task's config.
    fields = _config_fields("configs/pretrain.py:tiny") | _config_fields("configs/finetune.py:tiny")
  for arg in args:
    if not arg.startswith("--"):
      continue
    name = arg[2:].split("=")[0]
    if name.startswith("config."):
      assert name[len("config."):] in fields, f"{doc}: {tool} {arg}: no such config field"
    else:
      assert re.search(rf"--(\[no\])?{re.escape(name)}\b", help_text), \
          f"{doc}: tools/{tool}.py has no flag --{name}"
  if tool == "model_summary" and comment:  # needs no data: run it, compare with the quote
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "model_summary.py"),
                             *args], capture_output=True, text=True, timeout=300, check=True,
                            cwd=ROOT)
    assert result.stdout.strip().splitlines()[-1] == comment, result.stdout[-500:]
