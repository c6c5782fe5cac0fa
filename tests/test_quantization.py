"""8-bit and 4-bit (QLoRA) LoRA really train on CPU: gradients stay non-zero after an eval pass."""

from __future__ import annotations

import pytest
import torch

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.models.adapters import apply_peft, build_peft_config, resolve_target_modules
from alpaca_cot.models.loading import load_model
from alpaca_cot.models.registry import get_model_spec

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_lora_gets_gradients_after_eval(tiny_model_dir: str, bits: int, monkeypatch) -> None:
    import bitsandbytes.nn.modules as bnb_modules

    # Act as a CPU with AVX-512 BF16 (where bitsandbytes repacks 4-bit weights after an eval
    # forward), so the test guards the fix on any machine.
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    spec = get_model_spec("llama")
    model = load_model(tiny_model_dir, spec, dtype=torch.float32, quantization_bit=bits)
    assert getattr(model, "is_quantized", False) or getattr(model, f"is_loaded_in_{bits}bit", False)
    args = FinetuneArgs(model_name_or_path=tiny_model_dir, data=["x.json"], quantization_bit=bits)
    config = build_peft_config(args, resolve_target_modules(model, spec, None), total_steps=1)
    model = apply_peft(model, config, quantized=True, gradient_checkpointing=False)
    ids = torch.tensor([[1, 410, 38, 306, 414, 263, 304, 341, 13, 440]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # bitsandbytes' CPU 4-bit layer repacks its weights here
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    # lora_A gets gradient through lora_B only after B moves; B's gradient must be non-zero at once.
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
