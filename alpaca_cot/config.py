"""Fine-tuning arguments: fire kwargs -> one validated dataclass -> ``finetune_args.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from alpaca_cot.adapters import PEFT_TYPES
from alpaca_cot.cli import as_list
from alpaca_cot.errors import UserError
from alpaca_cot.io import write_json_atomic
from alpaca_cot.registry import get_model_spec
from alpaca_cot.templates import TEMPLATES

ARGS_FILE = "finetune_args.json"


@dataclass
class FinetuneArgs:
    """Everything a run depends on; saved next to the adapter and read back by the other scripts."""

    # model
    model_type: str = "llama"
    model_name_or_path: str | None = None
    trust_remote_code: bool = False
    compute_dtype: str = "auto"
    quantization_bit: int | None = None
    # data
    data: list[str] = field(default_factory=list)
    template: str | None = None
    cutoff_len: int = 512
    val_set_size: float = 2000
    max_samples: int | None = None
    train_on_inputs: bool = False
    cache_dir: str | None = None
    # PEFT
    peft_type: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False
    adalora_init_r: int = 12
    adalora_tinit: int = 200
    adalora_tfinal: int = 1000
    adalora_delta_t: int = 10
    num_virtual_tokens: int = 20
    prompt_encoder_hidden_size: int = 128
    # training
    per_gpu_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    epochs: float = 3
    max_steps: int = -1
    learning_rate: float = 3e-4
    warmup_ratio: float = 0.1
    gradient_checkpointing: bool = False
    packing: bool = True
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = None
    seed: int = 42
    report_to: str = "none"
    resume_from_checkpoint: str | bool | None = None
    # output
    output_dir: str | None = None
    overwrite_output_dir: bool = False

    def __post_init__(self) -> None:
        # fire guesses types from values ("1e-4" is a str, "q_proj,v_proj" a str, "4" an int).
        get_model_spec(self.model_type)
        if not self.model_name_or_path:
            raise UserError("Pass --model_name_or_path: a local model folder or a Hugging Face hub id.")
        self.model_name_or_path = str(self.model_name_or_path)
        if os.path.isdir(self.model_name_or_path):  # saved runs must work from any folder
            self.model_name_or_path = os.path.abspath(self.model_name_or_path)
        self.data = as_list(self.data) or []
        if not self.data:
            raise UserError("Pass --data: a dataset name from data/registry.json or one or more file paths.")
        self.lora_target_modules = as_list(self.lora_target_modules)
        if self.peft_type not in PEFT_TYPES:
            raise UserError(f"Unknown --peft_type {self.peft_type!r}; valid choices: {', '.join(PEFT_TYPES)}")
        if self.template is not None and self.template not in TEMPLATES:
            raise UserError(f"Unknown --template {self.template!r}; valid choices: {', '.join(TEMPLATES)}")
        for name in ("learning_rate", "lora_dropout", "warmup_ratio", "epochs", "val_set_size"):
            setattr(self, name, float(getattr(self, name)))
        for name in ("cutoff_len", "lora_r", "lora_alpha", "per_gpu_train_batch_size", "gradient_accumulation_steps",
                     "max_steps", "logging_steps", "seed"):
            setattr(self, name, int(getattr(self, name)))
        if self.cutoff_len < 8:
            raise UserError(f"--cutoff_len {self.cutoff_len} is too short; use at least 8 tokens.")
        if self.quantization_bit not in (None, 4, 8):
            raise UserError(f"Unknown --quantization_bit {self.quantization_bit!r}; valid choices: 8, 4")
        self.report_to = ",".join(as_list(self.report_to) or ["none"])
        if self.output_dir is None:
            model_name = os.path.basename(os.path.normpath(self.model_name_or_path))
            data_name = "+".join(os.path.splitext(os.path.basename(d))[0] for d in self.data)
            self.output_dir = os.path.join("saved_models", f"{model_name}_{data_name}_{self.learning_rate:g}",
                                           self.peft_type)

    def save(self, directory: str) -> None:
        """Write the arguments as JSON (other scripts read them back as defaults)."""
        write_json_atomic(os.path.join(directory, ARGS_FILE), dataclasses.asdict(self))

    @classmethod
    def load(cls, directory: str) -> FinetuneArgs:
        """The arguments a training run saved in ``directory``."""
        path = os.path.join(directory, ARGS_FILE)
        if not os.path.isfile(path):
            raise UserError(f"{directory} holds no {ARGS_FILE}: is it the output folder of uniform_finetune.py?")
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})
