"""Alpaca-CoT: instruction fine-tuning of causal language models on named instruction data."""
