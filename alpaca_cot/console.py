"""A quiet start-up: two library notices that need no action from the user are dropped at their source.

Each filter matches one message exactly, so every other warning of the same libraries still shows.
Installed once, when ``alpaca_cot`` is imported, before any script imports bitsandbytes or peft.
"""

from __future__ import annotations

import logging
import warnings

# bitsandbytes (0.49+) on CPUs with AVX-512 BF16 tries, while it is imported, to fetch an optional
# 4-bit CPU kernel through the ``kernels`` package, logs this when that package is not installed,
# and uses its own kernel instead. The same notice with any other cause (``kernels`` installed but
# failing) still shows.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# peft's PeftModel reads transformers' deprecated ``is_gradient_checkpointing`` alias whenever it
# wraps a model (peft 0.21, transformers 5), which warns on every training run and adapter load.
GRADIENT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"
GRADIENT_CHECKPOINTING_MODULE = r"transformers\.modeling_utils"


class MissingKernelsNotice(logging.Filter):
    """Drops bitsandbytes' notice that the optional ``kernels`` package is not installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for exactly that notice."""
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        missing_kernels = isinstance(cause, ModuleNotFoundError) and cause.name == "kernels"
        return not (str(record.msg).startswith(BNB_KERNELS_NOTICE) and missing_kernels)


def quiet_library_notices() -> None:
    """Install both filters (again only where they are missing, so calling it twice adds nothing)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, MissingKernelsNotice) for f in logger.filters):
        logger.addFilter(MissingKernelsNotice())
    # filterwarnings drops an identical earlier entry before inserting, so repeats do not pile up.
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_WARNING, category=FutureWarning,
                            module=GRADIENT_CHECKPOINTING_MODULE)
