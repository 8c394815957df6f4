"""The repository's docs are self-contained: no file cites a document outside the repository."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE = ("REFERENCE.md", "DESIGN.md", "STYLE.md", "MODEL_CONTRACT.md", "../shared")


def test_no_file_cites_a_document_outside_the_repository():
  files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
  offenders = []
  for name in files:
    if name == os.path.relpath(__file__, ROOT) or not name.endswith((".py", ".md", ".sh", ".toml")):
      continue
    with open(os.path.join(ROOT, name), encoding="utf-8", errors="replace") as f:
      text = f.read()
    offenders += [f"{name}: {word}" for word in OUTSIDE if word in text]
  assert not offenders, offenders
  assert os.path.isfile(os.path.join(ROOT, "docs", "original.md"))
