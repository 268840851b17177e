"""Typed errors, caught once at the CLI, each with the exit code the README documents.

Every message names the culprit (file, field, image) and, when there is one, the fix:
the CLI prints it as one paragraph, never as a traceback.
"""


class EdgetlError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI returns."""

    exit_code = 1


class RecipeError(EdgetlError):
    """The recipe file or a `--set` override is invalid."""

    exit_code = 2


class DataError(EdgetlError):
    """The dataset cannot be used as given (missing folder, empty class, bad image)."""

    exit_code = 2


class ModelError(EdgetlError):
    """A backbone or its weights cannot be built or loaded."""

    exit_code = 2


class BundleError(EdgetlError):
    """A deploy bundle is missing, incomplete or tampered with."""

    exit_code = 2


class OutputError(EdgetlError):
    """An output cannot be written: the disk is full, read-only, over quota, or not ours to write."""

    exit_code = 2


class ExportError(EdgetlError):
    """Export, conversion or a parity check between runtimes failed."""

    exit_code = 4


class GateFailure(EdgetlError):
    """A recipe gate was not met; the report is still written."""

    exit_code = 3


class InferenceError(EdgetlError):
    """A runtime cannot load or run a model file, or the model's outputs are not finite."""

    exit_code = 4


class DistributedError(EdgetlError):
    """Another process of a distributed (torchrun) build died, or a collective timed out."""

    exit_code = 6
