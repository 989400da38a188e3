"""The one exception tree of edgekit.

Every error a user can cause or meet carries a message (what went wrong) and a hint
(what to do about it), plus the exit code the CLI uses. The CLI root is the one place
that turns them into ``Error: ...`` / ``Hint: ...`` lines.

::

    EdgekitError                      exit 1
    ├── UsageError                    exit 2   bad flags or arguments
    ├── InputError                    exit 3   a file the user gave is missing or wrong
    │   ├── ModelLoadError                     not a model / truncated / unreadable
    │   ├── CalibrationDataError               .npz shape, dtype, NaN, empty, y length
    │   ├── ProfileError                       unknown id, bad YAML, unknown key, wrong type
    │   └── BundleError                        bad manifest, changed byte, missing file
    │       └── BundleTooLargeError                unpacking would pass a size or member limit
    ├── IncompatibleError             exit 4   profile cannot take this model / format
    ├── ConversionError               exit 5   a converter failed
    │   └── AccuracyBudgetError                no recipe met --max-accuracy-drop
    ├── RuntimeUnavailableError       exit 6   runtime missing or unsupported on this host
    ├── OutputError                   exit 7   the output location cannot be written
    ├── RemoteError                   exit 8   a fleet server, cloud model or SSH host refused or failed
    │   └── HostKeyError                       SSH host key unknown or changed
    └── VerificationError             exit 9   a bundle or assignment failed verification on the device
"""

from __future__ import annotations

__all__ = [
    "AccuracyBudgetError",
    "BundleError",
    "BundleTooLargeError",
    "CalibrationDataError",
    "ConversionError",
    "EdgekitError",
    "IncompatibleError",
    "InputError",
    "ModelLoadError",
    "OutputError",
    "ProfileError",
    "RuntimeUnavailableError",
    "UsageError",
    "RemoteError",
    "HostKeyError",
    "VerificationError",
]


class EdgekitError(Exception):
    """Base of every error edgekit raises on purpose."""

    exit_code = 1
    default_hint = "Run again with --debug for the full traceback."

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint

    def __str__(self) -> str:
        return self.message


class UsageError(EdgekitError):
    """Flags or arguments that do not make sense together."""

    exit_code = 2
    default_hint = "See --help for the command's options."


class InputError(EdgekitError):
    """A file or value the user gave is missing or wrong."""

    exit_code = 3


class ModelLoadError(InputError):
    """The model path is missing, not a model, or damaged."""

    default_hint = "Pass a .keras/.h5 file or a SavedModel directory."


class CalibrationDataError(InputError):
    """Calibration or evaluation data that does not fit the model."""

    default_hint = "Pass an .npz with float32 array 'x' in the model's input layout (and int 'y' for --eval)."


class ProfileError(InputError):
    """A hardware profile that is unknown or invalid."""

    default_hint = "Run 'edgekit profiles list' to see the valid ids."


class BundleError(InputError):
    """A bundle that is malformed or does not match its manifest."""

    default_hint = "Rebuild the bundle with 'edgekit convert'."


class BundleTooLargeError(BundleError):
    """Unpacking a bundle would pass a byte or member limit."""

    default_hint = "Raise EDGEKIT_MAX_BUNDLE_BYTES / EDGEKIT_MAX_BUNDLE_MEMBERS if this bundle is genuine."


class IncompatibleError(EdgekitError):
    """The hardware profile cannot take this model or format."""

    exit_code = 4
    default_hint = "Pick another profile or format ('edgekit profiles show ID')."


class ConversionError(EdgekitError):
    """A converter failed to produce a model."""

    exit_code = 5


class AccuracyBudgetError(ConversionError):
    """No quantization recipe kept the accuracy within the budget."""

    default_hint = "Raise --max-accuracy-drop, give more calibration data, or pass --allow-over-budget."


class RuntimeUnavailableError(EdgekitError):
    """The runtime for a format is not installed or cannot run on this host."""

    exit_code = 6
    default_hint = "Install the runtime with: pip install 'edgekit[agent]'."


class OutputError(EdgekitError):
    """The output location cannot be written."""

    exit_code = 7
    default_hint = "Choose a writable --out directory."


class RemoteError(EdgekitError):
    """A fleet server, cloud model server or SSH host refused the request or could not be reached."""

    exit_code = 8
    default_hint = "Check the URL or host, the token or key, and that the other side is running."


class HostKeyError(RemoteError):
    """An SSH host key that is not known (and not accepted) or that changed."""

    default_hint = "Check the host's fingerprint; pass --accept-new-host-key only for a host you trust."


class VerificationError(EdgekitError):
    """A bundle or assignment that must not be activated: bad signature, hash, expiry, serial, profile, numerics.

    ``reason`` is the protocol's machine-readable reason (docs/protocol.md)."""

    exit_code = 9
    default_hint = "The model was not activated; the previous model stays active."

    def __init__(self, message: str, hint: str | None = None, *, reason: str = "other") -> None:
        super().__init__(message, hint)
        self.reason = reason
