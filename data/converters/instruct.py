"""Single-turn sources: Alpaca and its relatives, seed tasks, prompt/completion pairs, MMCU, and
instruction-only prompt collections (no outputs, so not trainable)."""

from __future__ import annotations

from data.converters.base import BadRecord, Context, build_messages, listed, optional_text, text


def convert_alpaca(row: dict, ctx: Context, output_key: str = "output") -> list[dict]:
    """Alpaca ``{instruction, input, output}``. ``input`` may be missing or ''; Dolly's ``context``
    is read as the input. LLaMA-Factory's ``system`` and ``history`` ([[instruction, output], ...])
    make the record multi-turn; an empty ``history`` ('' or []) is the same as none."""
    instruction, output = text(row, "instruction"), text(row, output_key)
    query = optional_text(row, "input", "context")
    system = optional_text(row, "system")
    history = row.get("history") or []
    if not system and not history:
        return [{"instruction": instruction, "input": query, "output": output}]
    if not isinstance(history, list):
        raise BadRecord("history", "must be a list of [instruction, output] pairs")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRecord(f"history[{i}]", "must be a pair of strings [instruction, output]")
        turns += [("user", pair[0], f"history[{i}][0]"), ("assistant", pair[1], f"history[{i}][1]")]
    prompt = f"{instruction}\n{query}" if query else instruction
    turns += [("user", prompt, "instruction"), ("assistant", output, output_key)]
    return [build_messages(turns, ctx, system)]


def convert_gpteacher(row: dict, ctx: Context) -> list[dict]:
    """GPTeacher ``{instruction, input, response}``: Alpaca with the output called ``response``."""
    return convert_alpaca(row, ctx, output_key="response")


def convert_seed_tasks(row: dict, ctx: Context) -> list[dict]:
    """Self-instruct seed tasks (Stanford Alpaca, BELLE): ``{instruction, instances: [{input,
    output}]}``; one record per instance."""
    instruction = text(row, "instruction")
    records = []
    for i, instance in enumerate(listed(row, "instances")):
        if not isinstance(instance, dict):
            raise BadRecord(f"instances[{i}]", "must be an object with input and output")
        try:
            output, query = text(instance, "output"), optional_text(instance, "input")
        except BadRecord as e:
            raise BadRecord(f"instances[{i}].{e.field}", e.why) from None
        records.append({"instruction": instruction, "input": query, "output": output})
    return records


def convert_self_instruct(row: dict, ctx: Context) -> list[dict]:
    """GPT-3 fine-tuning format ``{prompt, completion}``; the ``<|endoftext|>`` end mark and the
    whitespace around both are removed."""
    prompt = text(row, "prompt").strip()
    completion = text(row, "completion").removesuffix("<|endoftext|>").strip()
    if not completion:
        raise BadRecord("completion", "is empty once '<|endoftext|>' is removed")
    return [{"instruction": prompt, "input": "", "output": completion}]


def convert_mmcu(row: dict, ctx: Context) -> list[dict]:
    """MMCU exam question ``{类别 (category), 题目 (question), 选项 (options), 答案 (answer letter)}``."""
    question, options, answer = text(row, "题目"), text(row, "选项"), text(row, "答案")
    return [{"instruction": f"{question}\n{options}", "input": "", "output": answer}]


def convert_instructionwild(row: dict, ctx: Context) -> list[dict]:
    """InstructionWild ``{instruction}``: a user prompt without a response (not trainable)."""
    return [{"instruction": text(row, "instruction"), "input": ""}]


def convert_moss_prompts(row: dict, ctx: Context) -> list[dict]:
    """MOSS ``{user_prompt}``: a user prompt without a response (not trainable)."""
    return [{"instruction": text(row, "user_prompt"), "input": ""}]


def convert_messages(row: dict, ctx: Context) -> list[dict]:
    """Already unified multi-turn ``{messages: [...]}``: kept as it is, then validated."""
    return [row]
