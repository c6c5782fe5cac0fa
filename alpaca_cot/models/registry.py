"""The model registry: one frozen record per ``--model_type``. Model quirks live here as data."""

from __future__ import annotations

from dataclasses import dataclass

from alpaca_cot.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    """How to load, adapt and prompt one model family."""

    model_class: str = "AutoModelForCausalLM"  # a transformers class name, for native checkpoints
    tokenizer_class: str = "AutoTokenizer"
    # Default LoRA targets; "all" = every linear layer but the output head. Where a family has
    # several layouts, the names the loaded model actually has are kept.
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # Seed target names that mean other module names in native layouts (old name -> new names).
    target_aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()
    template: str = "alpaca"
    # Checkpoints of this family commonly ship their own modeling code: it runs only with
    # --trust_remote_code, through this Auto class.
    remote_code: bool = False
    remote_model_class: str = "AutoModelForCausalLM"
    # Which existing special token pads, in order of preference ("unk" first keeps pad != eos,
    # so that padded EOS labels are not masked away, as the seed did for LLaMA).
    pad_token: tuple[str, ...] = ("pad", "unk", "eos")
    # --size -> default hub checkpoint, used only when no base model is known.
    sizes: tuple[tuple[str, str], ...] = ()


_QKV = (("query_key_value", ("q_proj", "k_proj", "v_proj")),)

MODEL_REGISTRY: dict[str, ModelSpec] = {
    "llama": ModelSpec(model_class="LlamaForCausalLM",
                       sizes=(("7b", "huggyllama/llama-7b"), ("13b", "huggyllama/llama-13b"))),
    # Native GLM classes for native checkpoints; ChatGLM-6B-style repos run remote code.
    "chatglm": ModelSpec(lora_targets=("query_key_value", "q_proj", "v_proj"), target_aliases=_QKV,
                         remote_code=True, remote_model_class="AutoModel", pad_token=("pad", "unk", "eos"),
                         sizes=(("6b", "THUDM/chatglm-6b"),)),
    "chatglm2": ModelSpec(lora_targets=("query_key_value",), target_aliases=_QKV, remote_code=True,
                          remote_model_class="AutoModel", sizes=(("6b", "THUDM/chatglm2-6b"),)),
    "glm": ModelSpec(lora_targets=("q_proj", "v_proj"), target_aliases=_QKV, template="chat",
                     pad_token=("pad", "eos"), sizes=(("9b", "THUDM/glm-4-9b-chat-hf"),)),
    "bloom": ModelSpec(model_class="BloomForCausalLM", lora_targets=("query_key_value",),
                       sizes=(("7b", "bigscience/bloomz-7b1-mt"),)),
    "moss": ModelSpec(lora_targets=("qkv_proj",), template="moss", remote_code=True,
                      sizes=(("16b", "fnlp/moss-moon-003-sft"),)),
    "baichuan": ModelSpec(lora_targets=("W_pack",), remote_code=True,
                          sizes=(("7b", "baichuan-inc/Baichuan-7B"), ("13b", "baichuan-inc/Baichuan-13B-Base"))),
    # InternLM (q_proj/v_proj) and InternLM2 (wqkv) both ship remote code.
    "internlm": ModelSpec(lora_targets=("q_proj", "v_proj", "wqkv"), remote_code=True,
                          sizes=(("7b", "internlm/internlm-7b"),)),
    "qwen2": ModelSpec(model_class="Qwen2ForCausalLM", template="chat", pad_token=("pad", "eos"),
                       sizes=(("0.5b", "Qwen/Qwen2.5-0.5B-Instruct"), ("7b", "Qwen/Qwen2.5-7B-Instruct"))),
    "mistral": ModelSpec(model_class="MistralForCausalLM", template="chat",
                         sizes=(("7b", "mistralai/Mistral-7B-Instruct-v0.3"),)),
    "gemma": ModelSpec(model_class="GemmaForCausalLM", template="chat",
                       sizes=(("2b", "google/gemma-2b-it"), ("7b", "google/gemma-7b-it"))),
    "gpt2": ModelSpec(model_class="GPT2LMHeadModel", lora_targets=("c_attn",), pad_token=("pad", "eos"),
                      sizes=(("124m", "openai-community/gpt2"),)),
    "auto": ModelSpec(lora_targets=("all",)),
}


def get_model_spec(model_type: str) -> ModelSpec:
    """The registry record of ``model_type``; an unknown type lists the known ones."""
    try:
        return MODEL_REGISTRY[model_type]
    except KeyError:
        raise UserError(f"Unknown --model_type {model_type!r}; known types: "
                         f"{', '.join(MODEL_REGISTRY)}") from None


def default_checkpoint(model_type: str, size: str | None) -> str:
    """The registry's hub checkpoint for ``--size``; an unknown size lists the known ones."""
    sizes = dict(get_model_spec(model_type).sizes)
    if size is None or str(size).lower() not in sizes:
        raise UserError(f"--model_type {model_type} has no default checkpoint for --size {size!r}; "
                         f"known sizes: {', '.join(sizes) or 'none'}; or pass --model_name_or_path")
    return sizes[str(size).lower()]
