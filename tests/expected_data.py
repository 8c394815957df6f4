"""tests/data/make_expected.py (the script that writes the stored expected values the fbank and
decode tests compare against) imported as a module, for its cases and reference helpers."""

import importlib.util
import os

DATA_DIR = os.path.join(os.path.dirname(__file__), 'data')


def _load_make_expected():
  spec = importlib.util.spec_from_file_location(
      'make_expected', os.path.join(DATA_DIR, 'make_expected.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


make_expected = _load_make_expected()
