"""Product error codes shared by the CLI, the daemon and the engines."""

MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
MODEL_INFERENCE_FAILED = "MODEL_INFERENCE_FAILED"
QUEUE_FULL = "QUEUE_FULL"
INVALID_DURATION = "INVALID_DURATION"
INVALID_PARAMS = "INVALID_PARAMS"
UNKNOWN_TRACK = "UNKNOWN_TRACK"
CANCELLED = "CANCELLED"
# model setup
NOT_ENOUGH_DISK = "NOT_ENOUGH_DISK"
DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
VERIFY_FAILED = "VERIFY_FAILED"
SETUP_BUSY = "SETUP_BUSY"


class LofiError(Exception):
    """An error a person can act on, carrying one of the codes above."""

    def __init__(self, code: str, message: str, data: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data or {}


class Cancelled(LofiError):
    def __init__(self, message: str = "cancelled"):
        super().__init__(CANCELLED, message)
