"""Errors caused by what the user passed: scripts print them as one line, without a traceback."""


class UserError(ValueError):
    """A wrong flag, file or record; the message says what to pass instead."""


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a full disk: ENOSPC (28), as safetensors and tokenizers say it, or torch.save's write
    failures (``basic_ios::clear: iostream error``, ``file write failed``), which name no cause."""
    text = str(error)
    return getattr(error, "errno", None) == 28 or any(
        s in text for s in ("No space left on device", "iostream error", "file write failed"))
