"""Training checkpoints: write, find, rotate and resume, with nothing pickled.

A checkpoint is a folder ``<output_dir>/checkpoints/step-NNNNNNN`` written atomically by the main process:

- ``adapter/``: the adapter as a PEFT folder (usable on its own);
- ``trainable.safetensors``: every trainable parameter by name (adapters, trained biases, ``modules_to_save``);
- ``state.safetensors``: AdamW's moments as ``optim.<parameter>.<field>``, every process's RNG state, and early
  stopping's best weights so far as ``best.<parameter>``;
- ``trainer_state.json``: step, run length, optimizer scalars and groups, Python's RNG, history, the config, and
  the shape of the run (processes, rows per optimizer step) that resuming must match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter_io import read_on_save, save_adapter
from ..atomic import atomic_dir, remove_leftovers
from ..inject import adapters_of


@contextlib.contextmanager
def whole_parameters(module: nn.Module):
    """Inside, what saving an adapter of ``module`` reads is whole on every process, however it is sharded.

    FSDP2 keeps each parameter as a DTensor holding this process's shard, and DeepSpeed ZeRO-3 leaves an empty
    tensor in place of every parameter between forwards; saving those writes empty or partial tensors, a known
    failure of other stacks. Both are gathered here (FSDP2 unshards whole modules; ZeRO-3 gathers only what saving
    reads, see :func:`lora.adapter_io.read_on_save`): a collective, so every process must enter together. Outside
    FSDP2 and ZeRO-3 this does nothing.
    """
    if any(hasattr(p, "ds_id") for p in module.parameters()):  # ZeRO-3's mark on the parameters it partitions
        import deepspeed

        partitioned = [p for p in read_on_save(module) if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(partitioned):  # read-only, on every process
            yield
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        yield
        return
    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def _is_dtensor(t: Any) -> bool:
    """An FSDP2 shard. Checked by name, so that torch builds without torch.distributed need nothing more."""
    return type(t).__name__ == "DTensor"


def is_sharded(model: nn.Module) -> bool:
    """Whether any trainable parameter is a shard (an FSDP2 DTensor)."""
    return any(_is_dtensor(p) or _is_dtensor(getattr(p, "data", None)) for p in model.parameters() if p.requires_grad)


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (and CUDA) as tensors, Python's ``random`` as JSON-able lists."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(_py_state_to_json(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(tensors: dict[str, torch.Tensor], python_state: list) -> None:
    """Put back states from :func:`rng_state` (``tensors`` holds its tensor entries)."""
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def _py_state_to_json(state: tuple) -> tuple:
    version, internal, gauss = state
    return version, list(internal), gauss


def gather_rng(accelerator: Any, rng: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every process's torch RNG tensors, keyed ``<name>.rank<i>`` (one entry per process).

    Dropout draws differ between processes as their batches differ in shape, so an exact resume needs each
    process's own state back, not the main process's.
    """
    out = {}
    for name, t in rng.items():
        if not isinstance(t, torch.Tensor):
            continue
        if accelerator.num_processes == 1:
            out[f"{name}.rank0"] = t
            continue
        rows = accelerator.gather(t.to(accelerator.device)[None]).cpu()  # (processes, state bytes)
        out.update({f"{name}.rank{i}": row.contiguous() for i, row in enumerate(rows)})
    return out


def optimizer_params(optimizer: torch.optim.Optimizer,
                     names: dict[int, str]) -> list[tuple[int, str, torch.Tensor]]:
    """``(index in optimizer.state_dict(), parameter name, parameter)`` for every parameter the optimizer holds.

    Paired through the parameter objects, not by position: the optimizer's order (its param groups) need not be the
    model's (issue 9).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    indices = [i for group in optimizer.state_dict()["param_groups"] for i in group["params"]]
    unnamed = [tuple(p.shape) for p in params if id(p) not in names]
    if unnamed:
        raise ValueError(f"the optimizer holds parameters that are not trainable parameters of the model (shapes "
                         f"{unnamed[:3]}); build it from [p for p in model.parameters() if p.requires_grad]")
    return [(i, names[id(p)], p) for i, p in zip(indices, params)]


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor's whole value: an FSDP2 shard (DTensor) is gathered from every process (a collective)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _sharded_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``param`` is: this process's shard of it when ``param`` is an FSDP2 DTensor."""
    whole = whole.to(param.device)
    if not _is_dtensor(param):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)  # every process has it


def optimizer_state(optimizer: torch.optim.Optimizer,
                    names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW's moments as tensors keyed by parameter name, and its scalar state as JSON (no pickle).

    Under FSDP2 the moments are shards: every process must call this, and each gets them whole.

    Args:
        optimizer: The optimizer.
        names: ``id(parameter) -> name`` for the model's trainable parameters.
    """
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, name, _ in optimizer_params(optimizer, names):
        for key, value in sd["state"].get(index, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"optim.{name}.{key}"] = _whole(value).detach().cpu().contiguous()
            else:
                scalars[f"{name}.{key}"] = float(value)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor],
                         meta: dict, source: Path) -> None:
    """Put the state written by :func:`optimizer_state` back, matched to the parameters by name.

    Raises:
        ValueError: the checkpoint ``source`` holds state for other parameters than the optimizer's.
    """
    entries: dict[str, dict[str, Any]] = {}  # parameter name -> its state; names hold dots, state keys do not
    for key, t in tensors.items():
        if key.startswith("optim."):
            name, _, field = key[len("optim."):].rpartition(".")
            entries.setdefault(name, {})[field] = t
    for key, value in meta["scalars"].items():
        name, _, field = key.rpartition(".")
        entries.setdefault(name, {})[field] = torch.tensor(value)
    pairs = optimizer_params(optimizer, names)
    expected = {name for _, name, _ in pairs}
    if entries and set(entries) != expected:
        raise ValueError(f"checkpoint {source} holds optimizer state for other parameters than this optimizer's "
                         f"(e.g. {sorted(set(entries) ^ expected)[:3]}); use another output_dir or resume=False")
    state = {index: {field: _sharded_like(t, p) if t.dim() > 0 else t for field, t in entries[name].items()}
             for index, name, p in pairs if name in entries}
    sd = optimizer.state_dict()
    groups = [{**g, **saved, "params": g["params"]} for saved, g in zip(meta["param_groups"], sd["param_groups"])]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@dataclasses.dataclass
class RunShape:
    """What a checkpoint must share with the run that resumes it."""

    total_steps: int
    processes: int
    batch_size: int
    grad_accum: int
    # None in checkpoints from before it was saved, when an epoch's last partial step was dropped
    steps_per_epoch: int | None = None

    @property
    def rows_per_step(self) -> int:
        return self.processes * self.batch_size * self.grad_accum

    def describe(self) -> str:
        return (f"{self.rows_per_step} rows per optimizer step ({self.processes} processes x batch_size "
                f"{self.batch_size} x grad_accum {self.grad_accum})")


class Checkpoints:
    """The checkpoints of one run: ``folder/step-NNNNNNN``, the newest ``keep`` of them kept.

    Args:
        folder: Where the step folders go.
        keep: How many of the newest checkpoints to keep.
    """

    def __init__(self, folder: Path, keep: int):
        self.folder = folder
        self.keep = keep

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first (names are zero-padded step numbers; ``atomic_dir`` renames a
        checkpoint into place only once it is whole)."""
        remove_leftovers(self.folder)  # a writer killed between its renames: put the step it replaced back first
        return sorted(self.folder.glob("step-*"))

    def latest(self) -> Path | None:
        done = self.all()
        return done[-1] if done else None

    def set_aside(self) -> tuple[list[Path], Path]:
        """Move every checkpoint (an earlier run's, before a fresh run writes its own) into the sibling folder
        ``<folder>.earlier``, replacing what an earlier fresh run put there; returns the checkpoints and that folder."""
        done, aside = self.all(), self.folder.with_name(self.folder.name + ".earlier")
        if done:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(self.folder, aside)
        return done, aside

    def save(self, step: int, model: nn.Module, optim_state: tuple[dict[str, torch.Tensor], dict] | None,
             adapter: str, rng: dict[str, Any], rng_tensors: dict[str, torch.Tensor], state: dict[str, Any],
             best_weights: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the checkpoint of ``step`` (main process only), then drop all but the newest ``keep``.

        Args:
            step: Optimizer steps done.
            model: The model (its trainable parameters and adapter are saved).
            optim_state: The optimizer's state from :func:`optimizer_state` (gathered by every process under FSDP2);
                None to save none (DeepSpeed's ZeRO optimizer keeps its state partitioned in its engine).
            adapter: The adapter saved as a PEFT folder.
            rng: This process's :func:`rng_state` at the step boundary (Python's part is saved).
            rng_tensors: Every process's torch RNG states, from :func:`gather_rng`.
            state: More JSON to keep in ``trainer_state.json`` (history, config, run shape).
            best_weights: Early stopping's best trainable weights so far, kept as ``best.<parameter>``.
        """
        final = self.folder / f"step-{step:07d}"
        # a checkpoint of this step already written (a periodic save, then the end of training after early stopping
        # put the best weights back) is replaced: the newest state of a step is the one to resume from
        with atomic_dir(final, owns=lambda name: True) as tmp:
            if adapters_of(model):
                save_adapter(model, tmp / "adapter", adapter=adapter)
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            save_file({n: p.detach().float().cpu().contiguous() for n, p in trainable.items()},
                      str(tmp / "trainable.safetensors"))
            tensors, meta = ({}, None) if optim_state is None else (dict(optim_state[0]), optim_state[1])
            tensors.update({f"rng.{k}": v for k, v in rng_tensors.items()})
            tensors.update({f"best.{k}": v.float().contiguous() for k, v in (best_weights or {}).items()})
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": step, "optimizer": meta, "python_random": rng["python"], **state}, indent=1))
        for old in self.all()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, shape: RunShape,
             process_index: int) -> dict[str, Any]:
        """Load checkpoint ``path`` into ``model``, ``optimizer`` and the RNGs; returns its ``trainer_state.json``,
        plus ``best_weights`` (early stopping's, by parameter name; empty if none were saved).

        A run with another number of processes may resume if it takes the same rows per optimizer step: every
        step then sees the same rows and the same summed gradient. Each process takes its own RNG state back (the
        main process's when the process count changed, so dropout draws then differ from an uninterrupted run's).

        Raises:
            ValueError: the checkpoint belongs to a run of another length or batch, or holds other parameters.
        """
        state = json.loads((path / "trainer_state.json").read_text())
        saved_epoch = state.get("shape", {}).get("steps_per_epoch")  # None: written before it was saved
        if state["total_steps"] != shape.total_steps:
            older = "" if saved_epoch is not None else (
                " (or the checkpoint is from an older version, whose epochs left out their last partial step: "
                "then set resume=False)")
            raise ValueError(f"checkpoint {path} was for a run of {state['total_steps']} steps, this one has "
                             f"{shape.total_steps}; keep the data and epochs/max_steps/min_steps the same to "
                             f"resume{older}")
        if "shape" in state:
            saved = RunShape(**state["shape"])
            if saved.rows_per_step != shape.rows_per_step:
                raise ValueError(
                    f"checkpoint {path} was written by a run taking {saved.describe()}; this one takes "
                    f"{shape.describe()}, so every later step would see other rows. Resume with processes x "
                    f"batch_size x grad_accum = {saved.rows_per_step}, or set resume=False")
        if None not in (saved_epoch, shape.steps_per_epoch) and saved_epoch != shape.steps_per_epoch:
            raise ValueError(f"checkpoint {path} was written by a run of {saved_epoch} steps per epoch, this one "
                             f"has {shape.steps_per_epoch}, so its steps would see other rows; keep the data, "
                             f"batch_size and grad_accum the same to resume, or set resume=False")
        if state["optimizer"] is None:
            raise ValueError(f"checkpoint {path} was written under DeepSpeed, whose engine keeps the optimizer "
                             f"state partitioned across processes, and holds none, so it cannot resume exactly; its "
                             f"adapter is in {path / 'adapter'}. Set resume=False, or train with DDP or FSDP to "
                             f"resume runs")
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        weights = load_file(str(path / "trainable.safetensors"))
        if set(weights) != set(trainable):
            raise ValueError(f"checkpoint {path} holds other trainable parameters than this model "
                             f"(e.g. {sorted(set(weights) ^ set(trainable))[:3]}); use another output_dir or "
                             f"resume=False")
        misshapen = [f"{n} is {tuple(p.shape)} here, {tuple(weights[n].shape)} in the checkpoint"
                     for n, p in trainable.items() if tuple(weights[n].shape) != tuple(p.shape)]
        if misshapen:  # checked before anything is copied: a failed resume leaves the model as it was
            raise ValueError(f"checkpoint {path} holds parameters of other shapes than this model ({misshapen[0]}"
                             f"{f', and {len(misshapen) - 1} more' if len(misshapen) > 1 else ''}): another r or "
                             f"another model. Resume with the settings of that run, or use another output_dir or "
                             f"resume=False")
        with torch.no_grad():
            for n, p in trainable.items():  # under FSDP2, each process takes its shard of the whole weight
                p.copy_(_sharded_like(weights[n].to(p.dtype), p))
        tensors = load_file(str(path / "state.safetensors"))
        load_optimizer_state(optimizer, {id(p): n for n, p in trainable.items()}, tensors, state["optimizer"], path)
        same_processes = state.get("shape", {}).get("processes", 1) == shape.processes
        rank = process_index if same_processes else 0
        rng = {}
        for key, t in tensors.items():
            if key.startswith("rng."):
                name, _, which = key[len("rng."):].partition(".")
                if which in ("", f"rank{rank}"):  # "" : a checkpoint from before per-process states
                    rng[name] = t
        set_rng_state(rng, state["python_random"])
        state["best_weights"] = {k[len("best."):]: t for k, t in tensors.items() if k.startswith("best.")}
        return state


__all__ = ["Checkpoints", "RunShape", "whole_parameters", "is_sharded", "rng_state", "set_rng_state", "gather_rng", "optimizer_state",
           "load_optimizer_state"]
