"""Command-line config loading shared by the entry points in scripts/.

`--config path.py:preset` loads a stage config (locked: no new keys), `--config.a.b=v` overrides
a field. A bad override ends the program with one line that names the key.
"""

from __future__ import annotations

import re
import sys
from typing import Sequence

from absl import flags

_SUGGESTION = re.compile(r"Did you mean \"(\w+)\" instead of \"(\w+)\"")
_KEY = re.compile(r"'(\w+)'")


def describe_flag_error(message: str, argv: Sequence[str]) -> str:
  """Rewrites an ml_collections / absl parsing error as one readable line."""
  text = " ".join(message.replace("\\n", " ").replace("\\'", "'").split())
  suggestion = _SUGGESTION.search(text)
  key = suggestion.group(2) if suggestion else (_KEY.search(text).group(1)
                                                if _KEY.fullmatch(text.strip()) else None)
  if key is None:
    return text
  overrides = [a.split("=", 1)[0].removeprefix("--config.") for a in argv
               if a.startswith("--config.")]
  path = next((p for p in overrides if key in p.split(".")), key)
  hint = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
  return f"unknown config key {path!r}{hint}"


def parse_flags(argv: Sequence[str]):
  """absl `flags_parser` for `app.run`: exits with a one-line message on a bad flag."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"error: {describe_flag_error(str(e), argv)}\nPass --help for usage.")
