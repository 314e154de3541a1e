"""The one exception type for a user's mistake, importable from any layer (no dependencies).

A `UserError` means "what you asked for cannot be done as asked": a missing file, an invalid value,
a checkpoint that holds another model. Every `python -m dydit_jax.*` tool turns it into one
`error: ...` line and a non-zero exit (`dydit_jax.cli`); anything else is a bug and keeps its
traceback. It subclasses ValueError so that library callers catching ValueError keep working.
"""


class UserError(ValueError):
  """A mistake in the input, the configuration or the files a tool was pointed at; the message
  names the field or file and, where there is one, the fix."""
