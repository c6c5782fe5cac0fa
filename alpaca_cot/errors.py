"""Errors caused by what the user passed: scripts print them as one line, without a traceback."""


class UserError(ValueError):
    """A wrong flag, file or record; the message says what to pass instead."""


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a full disk (ENOSPC; safetensors and tokenizers say it in their messages)."""
    return getattr(error, "errno", None) == 28 or "No space left on device" in str(error)  # 28: ENOSPC
