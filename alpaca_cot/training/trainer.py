"""The HF Trainer as a run uses it: whole-run totals, a seeded length-grouped order, a finished run's restore."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import peft
import torch
import transformers
from safetensors.torch import load_file
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler

from alpaca_cot.training.checkpoints import model_files
from alpaca_cot.training.engines import gathered_state_dict


class RunTotals(transformers.TrainerCallback, ExportableState):
    """Whole-run totals over all ranks: real and padded tokens trained on, the step losses summed over steps
    (each step's the mean over ranks) and the train loop's seconds without evaluations. Saved in every
    checkpoint (``ExportableState``), so a resumed run reports the whole run, whatever number of processes
    resumes it. Each rank adds its batches on its device (no per-step sync); the ranks pool them (``pool``, a
    collective) before each checkpoint, which only the main process writes and every rank restores."""

    def __init__(self) -> None:
        self.real_tokens = 0
        self.batch_tokens = 0
        self.loss_sum = 0.0
        self.seconds = 0.0
        # This rank's additions since the last pooling: device-side sums (read only when pooling; reading
        # them per step would sync a GPU every step) and host-side counts.
        self._loss: torch.Tensor | None = None
        self._masked_real: torch.Tensor | None = None
        self._real = self._batch = 0
        self._begin: float | None = None  # set when train() begins (the Trainer asks for state() before)
        self._base = self._eval = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._begin, self._base, self._eval = time.perf_counter(), self.seconds, 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:  # set by the flow callback, which runs first; every rank is here
            self.pool()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.pool()

    def add_batch(self, inputs: dict, loss: torch.Tensor) -> None:
        """Count one micro-batch's tokens and its loss (as the Trainer sums them for its logs)."""
        # CPO and ORPO (TRL) batches hold their chosen and rejected rows apart.
        for prefix in ("",) if "input_ids" in inputs else ("chosen_", "rejected_"):
            mask = inputs.get(f"{prefix}attention_mask")  # packed batches have none: every position is a real token
            if mask is None:
                self._real += inputs[f"{prefix}input_ids"].numel()
            else:
                self._masked_real = mask.sum() if self._masked_real is None else self._masked_real + mask.sum()
            self._batch += inputs[f"{prefix}input_ids"].numel()
        self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()

    def add_eval_seconds(self, seconds: float) -> None:
        """Leave an evaluation's seconds out of the train loop's."""
        self._eval += seconds

    def pool(self) -> None:
        """Add every rank's batches since the last pooling to the totals (a collective: call it on all ranks)."""
        loss = float(self._loss) if self._loss is not None else 0.0
        real = self._real + (int(self._masked_real) if self._masked_real is not None else 0)
        loss, real, batch = _sum_over_ranks([loss, real, self._batch])
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.loss_sum += loss / world
        self.real_tokens += int(real)
        self.batch_tokens += int(batch)
        self._loss = self._masked_real = None
        self._real = self._batch = 0
        if self._begin is not None:
            self.seconds = self._base + time.perf_counter() - self._begin - self._eval

    def state(self) -> dict:
        """What a checkpoint keeps (``ExportableState``): the totals as of the last pooling."""
        return {"args": {}, "attributes": {"real_tokens": self.real_tokens, "batch_tokens": self.batch_tokens,
                                           "loss_sum": self.loss_sum, "seconds": self.seconds}}


def _sum_over_ranks(values: list[float]) -> list[float]:
    """``values`` summed over the processes of a launcher (unchanged in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    # NCCL reduces only GPU tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    total = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


class CountingTrainer(transformers.Trainer):
    """Trainer that keeps ``RunTotals`` and draws each epoch's length-grouped order from ``seed + epoch``, whatever
    used the global random state before (an evaluation before training, or none on resume)."""

    restored_from: str | None = None  # the final checkpoint of a finished run that train() restored

    @property
    def totals(self) -> RunTotals:
        """The run's totals (a resume replaces the callback with the one restored from the checkpoint)."""
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, RunTotals))

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.totals.add_eval_seconds(time.perf_counter() - started)

    def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.totals.add_batch(inputs, loss)
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """An adapter's checkpoint gathers only its trained weights from the shards (``gathered_state_dict``), where
        the Trainer's gathers every weight (under FSDP the whole model into rank 0's memory)."""
        if not isinstance(self.model, peft.PeftModel):
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir or self.args.output_dir, state_dict=gathered_state_dict(self))

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> transformers.trainer_utils.TrainOutput:
        """``Trainer.train``, except from a checkpoint of the final step: transformers 5 would train one step
        past the end there (it checks the step limit only after a step), so the finished run is restored
        instead (a run killed during its final save): its state, totals and weights."""
        if resume_from_checkpoint:
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
            end = self.args.max_steps if self.args.max_steps > 0 else state.max_steps  # epochs: the same count
            if end and state.global_step >= end:
                return self._restore_finished(resume_from_checkpoint, state)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _restore_finished(self, checkpoint: str, state: TrainerState) -> transformers.trainer_utils.TrainOutput:
        self.restored_from, self.state = checkpoint, state
        totals = self.totals
        for name, value in state.stateful_callbacks.get(type(totals).__name__, {}).get("attributes", {}).items():
            setattr(totals, name, value)
        self.model = self.model_wrapped = load_weights(self.model, checkpoint)  # for the final evaluation, the caller
        if self.is_deepspeed_enabled and not is_deepspeed_zero3_enabled():
            # Without train() there is no DeepSpeed engine, and transformers evaluates without one only under
            # ZeRO-3 ("ZeRO inference"); under ZeRO-1/2 every rank holds the whole model: evaluate it as it is.
            self.is_deepspeed_enabled = False
        loss = totals.loss_sum / max(state.global_step, 1)
        return transformers.trainer_utils.TrainOutput(state.global_step, loss, {"train_runtime": 0.0})

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # Grouped for the global batch: accelerate deals each rank every world-th batch of this order, so
        # an optimizer step trains the same records whatever the number of processes.
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return EpochLengthSampler(global_batch, dataset.lengths(), self.args.seed)


def load_weights(model: Any, checkpoint: str) -> Any:
    """``model`` with the adapter (or whole model) weights a checkpoint saved, on every rank, before ``train()``
    wraps it: whole on each rank (DDP, FSDP, ZeRO-1/2), or ZeRO-3 partitions gathered one by one."""
    state: dict[str, torch.Tensor] = {}
    for name in model_files(checkpoint):
        path = os.path.join(checkpoint, name)
        if name.endswith(".safetensors"):
            state.update(load_file(path))
        elif name.endswith(".bin"):
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    if isinstance(model, peft.PeftModel):  # adapter names, AdaLoRA's ranks and prompt embeddings: peft's own load
        config = model.peft_config[model.active_adapter]
        if config.is_prompt_learning and config.peft_type != peft.PeftType.PROMPT_TUNING:
            # p-tuning and prefix tuning save their encoder's output, not its weights: load it as inference does
            return peft.PeftModel.from_pretrained(model.get_base_model(), checkpoint)
        if config.peft_type == peft.PeftType.ADALORA:  # saved resized to the ranks it kept: resize to them first
            config.rank_pattern = peft.AdaLoraConfig.from_pretrained(checkpoint).rank_pattern
        peft.set_peft_model_state_dict(model, state)
        return model
    params = dict(model.named_parameters())
    for key, tensor in state.items():
        param = params[key]
        with _gathered(param), torch.no_grad():
            param.copy_(tensor)
    return model


def _gathered(param: torch.nn.Parameter) -> Any:
    """A ZeRO-3 partitioned parameter whole for the block (DeepSpeed re-partitions rank 0's value after it)."""
    if not hasattr(param, "ds_tensor"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


class EpochLengthSampler(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from a generator seeded with ``seed + epoch``."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer at the start of each epoch
        self.epoch = epoch

    def __iter__(self) -> Any:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class AdaLoraCallback(transformers.TrainerCallback):
    """AdaLoRA re-allocates ranks from gradients after each optimizer step, before they are zeroed."""

    def __init__(self, model: Any):
        self.model = model

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.base_model.update_and_allocate(state.global_step)
