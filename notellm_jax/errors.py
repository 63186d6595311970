"""The project's own user-input errors. Command-line tools catch exactly these (one-line message, exit 2);
anything else is a bug or an environment problem and propagates with its traceback.

Each subclasses the built-in it refines (ValueError / FileNotFoundError), so callers that catch the
built-in keep working."""


class NotellmError(Exception):
    """Base of every user-input error; the message names the file, field or position at fault."""


class ConfigError(NotellmError, ValueError):
    """A config file, argument or override that is malformed or inconsistent."""


class InputFormatError(NotellmError, ValueError):
    """A malformed record in an input dump (file and line/byte in the message)."""


class StoreFormatError(NotellmError, ValueError):
    """A prepared-data (Parquet store, shards, split.json) file that does not have the expected shape."""


class DataQualityError(NotellmError, ValueError):
    """Input or prepared data that is well-formed but useless for a run: no training or validation pairs,
    every note in one split, timestamps in the wrong unit or the far future, one creation time for all
    notes, too few pairs for one batch. The message names the data (file or folder), the field or count
    at fault and the likely fix."""


class CheckpointError(NotellmError, ValueError):
    """A checkpoint that cannot be read as a supported model; the message names file and problem."""


class MissingInputError(NotellmError, FileNotFoundError):
    """An input the run needs (a dump, a prepared stage's output, a checkpoint, a tokenizer) is absent."""


class TrainingDivergedError(NotellmError, RuntimeError):
    """Training steps turned non-finite (loss or gradient norm) beyond `train.max_nonfinite_steps`, or a
    finite step broke one of the guard's rules (loss spike, logit scale, gradient norm; train/guard.py); the
    message names the step, the quantity and the last good checkpoint. CLIs exit with status 3 (not 2: the
    input may be fine)."""
    exit_code = 3
