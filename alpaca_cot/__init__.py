"""Alpaca-CoT: instruction fine-tuning of causal language models on named instruction data."""

from alpaca_cot.console import quiet_library_notices

quiet_library_notices()
