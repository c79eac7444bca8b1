"""Error types. User mistakes and bugs are kept apart so the CLI can tell them apart.

``OnnxoptError`` subclasses that are the user's to fix (a bad path, a broken model,
data that does not match the model) end the CLI with a one-line message and exit 2.
``PassError`` and ``InternalError`` are bugs in onnxopt and keep their traceback.
"""


class OnnxoptError(Exception):
    """Base of every error onnxopt raises on purpose."""


class UserError(OnnxoptError):
    """Something the user gave us is wrong; the message says what. CLI exit code 2."""


class UnsupportedModelError(UserError):
    """The model cannot be read, is invalid, or uses something onnxopt refuses to touch."""


class DataError(UserError):
    """Sample data does not match the model (names, ranks, shapes, dtypes)."""


class ValidationFailed(OnnxoptError):
    """An output moved beyond its tolerance or budget. CLI exit code 1."""


class PassError(OnnxoptError):
    """A pass raised unexpectedly (a bug in the pass, never the user's fault)."""


class VerificationError(OnnxoptError):
    """``--verify-each`` found a pass that changed the model's outputs."""


class InternalError(OnnxoptError):
    """An invariant of onnxopt itself does not hold."""
