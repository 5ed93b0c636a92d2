"""User-facing errors.

Anything raised as an :class:`MRCError` is a problem with the user's input,
configuration or environment; its message is meant to be shown as it is (one
line in the CLI, a 4xx body in the service), never as a traceback.

Input errors carry the HTTP status and machine-readable code the service
answers them with, so every decode and validation path ends in one typed 4xx
without the service having to know which step raised.
"""


class MRCError(Exception):
    """Base class of every error whose message is meant for the user."""


class InvalidInputError(MRCError, ValueError):
    """The input cannot be turned into a grid of views (bad bytes, shape, size)."""

    status = 400
    code = "invalid_image"


class TooManyPixelsError(InvalidInputError):
    """The input declares more pixels than allowed (a decompression-bomb or work guard)."""

    status = 413
    code = "too_large"


class UnsupportedFormatError(InvalidInputError):
    """The bytes are an image, but of a format the metric does not decode (e.g. TIFF, GIF)."""

    status = 415
    code = "unsupported_format"


class ConfigError(MRCError, ValueError):
    """A setting is unknown or out of range."""


class WeightsMissingError(MRCError, FileNotFoundError):
    """Model weights are needed but not on this machine; the message says how to get them."""


class WeightsMismatchError(MRCError, ValueError):
    """Weights were found but do not match what was expected (hash, keys or shapes)."""
