"""User-facing errors.

Every problem a user can cause (bad flags, missing assets, malformed files) raises a subclass of
`CooperError` with a one-line message that names the problem. Entry points catch `CooperError`,
print the message and exit nonzero; anything else is a bug and keeps its traceback.
"""


class CooperError(Exception):
  """Base class of errors caused by user input, not by bugs."""


class AssetMissingError(CooperError):
  """An offline asset (model, tokenizer or dataset package) is not installed."""


class ConfigError(CooperError):
  """A config value or flag is invalid."""


class DataError(CooperError):
  """A dataset file is malformed (missing columns, empty texts, unknown labels)."""


class LoaderError(CooperError):
  """A checkpoint or model file is missing a tensor, has a mis-shaped one, or is unreadable."""


class TrainingError(CooperError):
  """Training cannot go on as configured (e.g. the loss became NaN: the rate is too high)."""


class CheckpointError(CooperError):
  """No usable checkpoint to resume from, or one that belongs to another run or config."""


class WorkdirError(CooperError):
  """The workdir cannot be used: not ours to overwrite, not writable, or a directory to protect."""
