"""The exception hierarchy. The launcher maps these to exit codes: ConfigError -> 2, RunError -> 1."""


class PsrvError(Exception):
    """Base class of every error psrv raises on purpose."""


class ConfigError(PsrvError):
    """A usage or configuration mistake: bad key, bad type, bad value, unusable data file (exit 2)."""


class DataError(ConfigError):
    """The training data cannot be used as configured (missing file, ragged CSV, NaN, bad labels)."""


class ProtocolError(PsrvError):
    """A message that does not follow docs/protocol.md. `code` is the machine-readable reason."""

    def __init__(self, reason: str, code: str = "bad_message"):
        super().__init__(reason)
        self.code = code
        self.rid: int | None = None   # the request id of the message refused, once its header was read


class RunError(PsrvError):
    """A failure at run time (exit 1). `process` names who failed: 'server', 'worker 3', 'launcher'."""

    def __init__(self, process: str, cause: str):
        super().__init__(f"{process}: {cause}")
        self.process = process
        self.cause = cause


class ServerLost(RunError):
    """A worker or client stopped hearing from the server for longer than its timeout."""


class AlreadyFinished(PsrvError):
    """--resume of a run that has already reached its step or epoch budget: nothing is changed (exit 0)."""
