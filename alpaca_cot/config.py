"""Every flag of the six scripts, declared once: fire kwargs -> validated dataclasses.

``FinetuneArgs`` is saved as ``finetune_args.json`` next to the adapter and read back by the other
scripts as defaults. The inference scripts share ``ModelArgs`` and ``SamplingParams`` (in
``alpaca_cot.generation.sampling``); each script adds one group of its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from alpaca_cot.data.columns import parse_columns
from alpaca_cot.data.templates import TEMPLATES
from alpaca_cot.errors import UserError
from alpaca_cot.flags import check_fields, flag
from alpaca_cot.io import write_json_atomic
from alpaca_cot.models.adapters import PEFT_TYPES
from alpaca_cot.models.registry import MODEL_REGISTRY, default_checkpoint
from alpaca_cot.training.engines import DEEPSPEED_PRESETS, check_engine_flags

ARGS_FILE = "finetune_args.json"
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
QUANT_CHOICES = (8, 4)
SEED_RANGE = {"min": 0, "max": 2**32 - 1}  # what numpy's and torch's global seeding both take
# TRL 1.16's loss_type values per preference stage (SimPO is CPO's "simpo" loss; ORPO has one loss), default first.
PREF_LOSSES = {"dpo": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                       "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
               "orpo": (), "simpo": ("simpo",), "kto": ("kto", "apo_zero_unpaired")}
STAGES = ("sft", *PREF_LOSSES)
DEFAULT_TASK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "lm_eval")
_HELP = {
    "model_type": "the registry record: " + ", ".join(MODEL_REGISTRY),
    "trust_remote_code": "run the checkpoint's own modeling code (only for sources you trust)",
    "compute_dtype": "auto (bf16 where measured faster than fp32 on this device) | fp32 | bf16 | fp16",
    "quantization_bit": "load the base quantized with bitsandbytes: 8 or 4 (QLoRA)",
    "size": "a registry checkpoint size (e.g. 7b), used only when no base model is given",
    "template": "prompt template: " + " | ".join(TEMPLATES) + " (default: the registry's for the model type)",
}


@dataclass
class FinetuneArgs:
    """Everything a run depends on; saved next to the adapter and read back by the other scripts."""

    # model
    model_type: str = flag("llama", _HELP["model_type"], choices=tuple(MODEL_REGISTRY))
    model_name_or_path: str | None = flag(None, "base model: a local folder or a Hugging Face hub id")
    size: str | None = flag(None, _HELP["size"])
    trust_remote_code: bool = flag(False, _HELP["trust_remote_code"])
    compute_dtype: str = flag("auto", _HELP["compute_dtype"], choices=DTYPE_CHOICES)
    quantization_bit: int | None = flag(None, _HELP["quantization_bit"], choices=QUANT_CHOICES)
    # data
    data: list[str] = flag([], "dataset names (data/registry.json) or unified-format JSON/JSONL/Parquet/CSV files and "
                               "folders; spaces or commas between several")
    columns: dict[str, str] | None = flag(None, "map the fields of --data files and hub datasets onto records, with "
                                                "LLaMA-Factory's names: prompt, query, response, history, system or "
                                                "messages (+ role_tag, content_tag, user_tag, assistant_tag, "
                                                "system_tag), e.g. prompt=question,response=answer")
    template: str | None = flag(None, _HELP["template"], choices=tuple(TEMPLATES))
    cutoff_len: int = flag(512, "the longest training sequence, in tokens", min=8)
    val_set_size: float = flag(2000, "validation records: a count, or a fraction when below 1 (0 = none)", min=0)
    max_samples: int | None = flag(None, "train on the first N records only", min=1)
    train_on_inputs: bool = flag(False, "also train on the prompt tokens")
    cache_dir: str | None = flag(None, "tokenized-data cache (default ~/.cache/alpaca_cot/tokenized)")
    data_files: list[str] | None = flag(None, "with a Hugging Face dataset id (org/name) in --data: the files of it "
                                              "to load (globs, e.g. CoT/*.json)")
    subset: str | None = flag(None, "with a Hugging Face dataset id in --data: its configuration (subset) name")
    preprocessing_num_workers: int | None = flag(None, "processes that tokenize (default: the usable CPU cores, up "
                                                       "to 8, one per 5,000 records)", min=1)
    streaming: bool = flag(False, "tokenize --data as the Trainer reads it, with no cache (corpora larger than the "
                                  "disk); needs --max_steps and --val_set_size as a count")
    # PEFT
    peft_type: str = flag("lora", " | ".join(PEFT_TYPES), choices=PEFT_TYPES)
    lora_r: int = flag(8, "LoRA rank (AdaLoRA: the target rank)", min=1)
    lora_alpha: float = flag(16, "LoRA scaling numerator (scale = alpha / r)", above=0)
    lora_dropout: float = flag(0.05, "dropout on LoRA's input", min=0, below=1)
    lora_target_modules: list[str] | None = flag(None, "linear layers to adapt (names, or 'all'); default: the "
                                                       "registry's for the model type")
    use_dora: bool = flag(False, "weight-decomposed LoRA (DoRA)")
    use_rslora: bool = flag(False, "rank-stabilised LoRA scaling (alpha / sqrt(r))")
    adalora_init_r: int = flag(12, "AdaLoRA's initial rank", min=1)
    adalora_tinit: int | None = flag(None, "AdaLoRA: steps before rank pruning (default 10% of the run)", min=0)
    adalora_tfinal: int | None = flag(None, "AdaLoRA: final steps at the target rank (default 20% of the run)",
                                      min=0)
    adalora_delta_t: int | None = flag(None, "AdaLoRA: steps between rank updates (default 1% of the run)", min=1)
    num_virtual_tokens: int = flag(20, "prompt/p-tuning/prefix: virtual tokens", min=1)
    prompt_encoder_hidden_size: int = flag(128, "p-tuning/prefix: the prompt encoder's hidden size", min=1)
    # training
    per_gpu_train_batch_size: int = flag(4, "records per batch per device", min=1)
    gradient_accumulation_steps: int = flag(1, "batches per optimizer step", min=1)
    epochs: float = flag(3, "passes over the training data", above=0)
    max_steps: int = flag(-1, "optimizer steps (overrides --epochs; -1 = use --epochs)", min=-1)
    learning_rate: float = flag(3e-4, "peak learning rate", above=0)
    warmup_ratio: float = flag(0.1, "fraction of the steps spent warming up the learning rate", min=0, max=1)
    dataloader_num_workers: int = flag(0, "processes that collate batches beside training (0 = in the training "
                                          "process)", min=0)
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward pass (less memory)")
    packing: bool = flag(True, "padding-free batches where exact for the model (else padded)")
    use_liger_kernel: bool = flag(False, "Liger's fused kernels (CUDA, liger-kernel installed): linear cross-entropy "
                                         "without materialised logits, RMSNorm, RoPE, SwiGLU")
    torch_compile: bool = flag(False, "compile the model with torch.compile (the first steps pay the compilation)")
    logging_steps: int = flag(10, "optimizer steps between loss logs", min=1)
    eval_steps: int | None = flag(None, "optimizer steps between evaluations (default a fifth of the run)", min=1)
    save_steps: int | None = flag(None, "optimizer steps between checkpoints (default a fifth of the run)", min=1)
    seed: int = flag(42, "seeds the data split, the adapter's initialisation, dropout and the batch order",
                     **SEED_RANGE)
    report_to: str = flag("none", "where to send logs: none, tensorboard, wandb, ... (commas between several)")
    resume_from_checkpoint: str | bool | None = flag(None, "True: the latest complete checkpoint in --output_dir; "
                                                           "or a checkpoint folder")
    deepspeed: str | None = flag(None, "DeepSpeed ZeRO: " + " | ".join(DEEPSPEED_PRESETS) + " (configs/deepspeed/) "
                                       "or a JSON config file; under a launcher (deepspeed, torchrun)")
    fsdp: str | bool = flag(False, "FSDP2 sharding, each decoder layer one unit: True (full sharding) or the "
                                   "Trainer's words, several between spaces: full_shard | shard_grad_op (keep the "
                                   "gathered weights until the backward) | offload (shards in CPU memory) | auto_wrap; "
                                   "under a launcher (torchrun, accelerate launch), on CUDA GPUs")
    fsdp_offload: bool = flag(False, "with --fsdp: keep the sharded weights, gradients and optimizer states in "
                                     "CPU memory")
    # preference stage
    stage: str = flag("sft", "sft (instruction records) | dpo | orpo | simpo (preference pairs) | kto (replies with a "
                             "label), through TRL's trainers", choices=STAGES)
    pref_beta: float = flag(0.1, "a preference stage's beta (TRL's: the reference's weight in DPO and KTO, the "
                                 "odds ratio's in ORPO, the reward scale in SimPO)", above=0)
    pref_loss: str | None = flag(None, "TRL's loss_type: " + "; ".join(f"{k}: {' | '.join(v)}" for k, v in
                                                                       PREF_LOSSES.items() if v)
                                 + " (default: the first)")
    precompute_ref_logps: bool = flag(False, "dpo, kto: compute the reference's log-probabilities once, before "
                                             "training (no reference forward pass per step)")
    lora_dir: str | None = flag(None, "a preference stage: start from this LoRA adapter (an SFT run's output "
                                      "folder), which is also the reference; default: a new adapter, the base as "
                                      "reference")
    # output
    output_dir: str | None = flag(None, "where the run goes (default saved_models/MODEL_DATA_LR/PEFT)")
    overwrite_output_dir: bool = flag(False, "replace a previous run in --output_dir once this one has finished")

    def __post_init__(self) -> None:
        self.columns = parse_columns(self.columns)
        check_fields(self)
        check_stage_flags(self)
        if not self.model_name_or_path and self.lora_dir and os.path.isfile(os.path.join(self.lora_dir, ARGS_FILE)):
            self.model_name_or_path = FinetuneArgs.load(self.lora_dir).model_name_or_path  # the SFT run's base
        if not self.model_name_or_path and self.size is not None:
            self.model_name_or_path = default_checkpoint(self.model_type, self.size)
        if not self.model_name_or_path:
            raise UserError("Pass --model_name_or_path: a local model folder or a Hugging Face hub id.")
        if os.path.isdir(self.model_name_or_path):  # saved runs must work from any folder
            self.model_name_or_path = os.path.abspath(self.model_name_or_path)
        if not self.data:
            raise UserError("Pass --data: a dataset name from data/registry.json or one or more file paths.")
        if self.max_steps == 0:
            raise UserError("--max_steps 0 trains nothing: pass -1 (use --epochs) or at least 1")
        if self.adalora_init_r < self.lora_r and self.peft_type == "adalora":
            raise UserError(f"--adalora_init_r {self.adalora_init_r} must be at least --lora_r {self.lora_r} "
                            "(AdaLoRA prunes ranks down to --lora_r)")
        if self.quantization_bit is not None and self.peft_type == "full":
            raise UserError("--peft_type full cannot train a quantized model; drop --quantization_bit.")
        if self.output_dir is None:
            model_name = os.path.basename(os.path.normpath(self.model_name_or_path))
            data_name = "+".join(os.path.splitext(os.path.basename(d))[0] for d in self.data)
            self.output_dir = os.path.join("saved_models", f"{model_name}_{data_name}_{self.learning_rate:g}",
                                           self.peft_type if self.stage == "sft" else f"{self.stage}_{self.peft_type}")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise UserError(f"--output_dir {self.output_dir} is an existing file; pass a folder.")
        check_engine_flags(self)

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


def check_stage_flags(args: FinetuneArgs) -> None:
    """Refuse preference flags that the stage does not take, and a --pref_loss TRL does not offer for it."""
    stage = args.stage
    if stage == "sft":
        given = [f"--{name}" for name in ("pref_loss", "lora_dir") if getattr(args, name)]
        if args.precompute_ref_logps:
            given.append("--precompute_ref_logps")
        if given:
            raise UserError(f"{', '.join(given)} applies to a preference stage (--stage {' | '.join(STAGES[1:])})")
        return
    if args.pref_loss is not None and args.pref_loss not in PREF_LOSSES[stage]:
        valid = f"valid choices: {', '.join(PREF_LOSSES[stage])}" if PREF_LOSSES[stage] else "ORPO has one loss"
        raise UserError(f"--pref_loss {args.pref_loss!r} is not a loss of --stage {stage}; {valid}")
    args.pref_loss = args.pref_loss or next(iter(PREF_LOSSES[stage]), None)  # saved with the run: the loss it used
    if stage == "kto" and args.pref_loss == "kto" and args.per_gpu_train_batch_size < 2:
        raise UserError("--stage kto with its KL term needs --per_gpu_train_batch_size of at least 2 (TRL pairs each "
                        "record with another reply of its batch); or pass --pref_loss apo_zero_unpaired")
    if args.precompute_ref_logps and stage in ("orpo", "simpo"):
        raise UserError(f"--precompute_ref_logps: --stage {stage} has no reference model (dpo and kto have one)")
    if args.peft_type not in ("lora", "full"):
        raise UserError(f"--stage {stage} trains --peft_type lora or full, not {args.peft_type}")
    if args.lora_dir and args.peft_type != "lora":
        raise UserError("--lora_dir continues a LoRA adapter: drop --peft_type full")
    if args.streaming or args.train_on_inputs:
        raise UserError(f"--{'streaming' if args.streaming else 'train_on_inputs'} applies to --stage sft only (a "
                        "preference stage reads its files whole, and its loss reads the replies only)")


@dataclass
class ModelArgs:
    """The model the inference scripts run: a run's output folder, any PEFT adapter, or a base model."""

    lora_dir: str | None = flag(None, "an output folder of uniform_finetune.py, or any PEFT adapter folder; "
                                      "its saved arguments give the base model, type and template")
    model_type: str | None = flag(None, _HELP["model_type"] + " (default: the run's)",
                                  choices=tuple(MODEL_REGISTRY))
    model_name_or_path: str | None = flag(None, "the base model (default: the run's or the adapter's)")
    size: str | None = flag(None, _HELP["size"])
    template: str | None = flag(None, _HELP["template"].replace("registry's", "run's, else the registry's"),
                                choices=tuple(TEMPLATES))
    compute_dtype: str = flag("auto", _HELP["compute_dtype"], choices=DTYPE_CHOICES)
    quantization_bit: int | None = flag(None, _HELP["quantization_bit"], choices=QUANT_CHOICES)
    trust_remote_code: bool = flag(False, _HELP["trust_remote_code"])

    def __post_init__(self) -> None:
        check_fields(self)

    def loader_kwargs(self) -> dict:
        """Keyword arguments for ``alpaca_cot.models.loading.load_for_inference``."""
        return dataclasses.asdict(self)


@dataclass
class GenerateArgs:
    """generate.py: one instruction, or an interactive loop."""

    data: str | None = flag(None, "without --lora_dir: use the newest run under saved_models/ trained on this data")
    instruction: str | None = flag(None, "answer this and exit (default: read instructions until Ctrl-D)")
    input: str = flag("", "the record's input field, with --instruction")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class PredictArgs:
    """predict.py: inputs, batch size and where predictions go."""

    data: list[str] = flag([], "dataset names or unified-format JSON/JSONL files to predict")
    max_samples: int | None = flag(None, "predict the first N records only", min=1)
    predict_batch_size: int = flag(8, "records generated together", min=1)
    result_dir: str = flag("saved_result.jsonl", "the predictions file (.jsonl/.json/.txt) or a folder for "
                                                 "predictions.jsonl")
    metrics: bool = flag(False, "score the predictions (exact match, ROUGE-L) into a JSON file beside them")
    overwrite: bool = flag(False, "predict again instead of resuming")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.data:
            raise UserError("Pass --data: a dataset name from data/registry.json or one or more file paths.")


@dataclass
class EvaluateArgs:
    """evaluate.py: what to evaluate on, how to prompt, and where the results go."""

    data: list[str] = flag([], "unified-format files or dataset names, each scored by its kind: SFT records by "
                               "chain-of-thought exact match, preference pairs by preference accuracy")
    tasks: list[str] = flag([], "lm-evaluation-harness task names (commas between several)")
    output_dir: str | None = flag(None, "the folder for results.json, results.md and generations/")
    num_fewshot: int = flag(0, "worked examples before each question: other records of the same --data; for "
                               "--tasks, from the task's few-shot split (0: the task's own default)", min=0)
    max_samples: int | None = flag(None, "evaluate the first N records of each --data (the --limit of --tasks)",
                                   min=1)
    eval_batch_size: int = flag(8, "records generated (or scored, or pairs scored) together", min=1)
    eval_loss: bool = flag(True, "also compute the reference answers' loss (one forward pass per record)")
    cutoff_len: int = flag(1024, "the longest sequence the eval loss (or a pair's prompt and reply) reads, in "
                                 "tokens", min=8)
    include_path: str = flag(DEFAULT_TASK_DIR, "a folder of extra lm-eval task configs (YAML), e.g. offline "
                                               "tasks over local files")
    fewshot_seed: int = flag(0, "chooses each record's few-shot examples (and lm-eval's)", min=0, max=2**32 - 1)
    overwrite: bool = flag(False, "evaluate again instead of resuming")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.data and not self.tasks:
            raise UserError("Pass --data (files or dataset names to score by exact match) or --tasks "
                            "(lm-evaluation-harness tasks), or both.")
        if not self.output_dir:
            raise UserError("Pass --output_dir: the folder for results.json, results.md and the generations.")


@dataclass
class MergeArgs:
    """merge.py: where the merged model goes."""

    merged_dir: str | None = flag(None, "output folder (default LORA_DIR-merged)")
    save_dtype: str = flag("auto", "dtype of the saved weights: auto (the base checkpoint's) | fp32 | bf16 | fp16",
                           choices=("auto", "fp32", "bf16", "fp16"))
    max_shard_size: str = flag("2GB", "largest safetensors shard")
    overwrite: bool = flag(False, "replace a non-empty --merged_dir")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ChatArgs:
    """server.py: the terminal conversation."""

    system: str | None = flag(None, "a system message for the conversation")
    context_window: int | None = flag(None, "tokens of history kept (default: the model's own window)", min=16)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ServeArgs:
    """web.py: where and how the HTTP server listens."""

    host: str = flag("127.0.0.1", "address to bind (0.0.0.0 serves other machines too: set --api_key)")
    port: int = flag(8410, "TCP port (0: a free one, printed at start)", min=0, max=65535)
    api_key: str | None = flag(None, "require 'Authorization: Bearer KEY' (default: $ALPACA_COT_API_KEY)")
    ui: bool = flag(True, "serve the chat page at /ui/ (False: the API alone)")
    max_batch_size: int = flag(64, "requests decoded together, each streamed to its own client (1: one at a time)",
                               min=1)
    # 2 MiB: well above any prompt a served context window holds (128k tokens of JSON text is about 600 KB),
    # well below what hurts the server to read and parse.
    max_request_bytes: int = flag(2 * 2**20, "largest request body; a larger one gets 413", min=1024)

    def __post_init__(self) -> None:
        check_fields(self)
