"""The one error a conversion raises: a sentence naming the file and the tensor at fault.

A checkpoint that does not convert is a user's input problem (a missing shard, a tensor of the
wrong shape, an unsupported architecture), not a bug: scripts/convert.py prints its message as
one `error: ...` line instead of a traceback. It subclasses ValueError so callers that catch
ValueError (tests, the stage runner) keep working.
"""

from __future__ import annotations


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names file and tensor."""
