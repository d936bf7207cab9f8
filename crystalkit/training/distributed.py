"""Data-parallel training across processes started by ``torchrun`` or ``accelerate launch``.

Both launchers describe the job in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); :func:`process_group` joins it. Every rank lays out the whole
global batch of a step (so corruption draws exactly what a single process would), keeps its
contiguous shard of rows, cuts that into ``grad_accum_steps`` micro-batches and sums gradients
across ranks after backward.

Why not ``DistributedDataParallel``: DDP prepares its reducer at each call of the wrapped
module's forward and expects that call's backward to follow, while a CrystaL step calls the
backbone several times per backward (the packed sequence is cut into chunks at recurrent latent
slots; the two-pass strategy runs two passes), calls ``embed`` outside forward, and accumulation
adds backwards that must not sync (``no_sync``). One bucketed all-reduce of the gradients after
the last backward computes what DDP computes, with no assumption about how the step uses the
model; it gives up DDP's overlap of communication with backward.

``train.fsdp`` shards parameters, gradients and optimizer state instead (FSDP2 ``fully_shard`` on
every transformers decoder/vision block and on the backbone as the root): FSDP2 all-gathers a
block's weights at each of its forward calls and reduce-scatters its gradients in backward, so
several forwards per step are fine as long as gradients reach every block through its outputs,
which is not so in the two-pass strategy (the corrupted pass reads the intact pass's keys and
values straight from the cache), hence the restrictions in :func:`data_parallel`.

Exactness: each loss term is a mean over some unit (answer tokens, samples with an answer, ...).
A shard's mean is rescaled by ``shard count / global count`` of that unit (the global counts come
from the global layout every rank holds, so they need no communication), which makes the sum over
ranks and micro-batches equal to the single-process mean; gradients are then *summed*.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from crystalkit.config.schema import Recipe
from crystalkit.crystal.layout import Layout
from crystalkit.crystal.method import Method
from crystalkit.crystal.packing import Segment
from crystalkit.data.prompt import IGNORE_INDEX
from crystalkit.errors import UsageError
from crystalkit.objectives.contract import UNITS, objective_units
from crystalkit.runs.checkpoint import base_fingerprint
from crystalkit.seeding import derived_seed

#: how long a rank waits at a collective, e.g. while rank 0 evaluates alone (the default is 10 min)
TIMEOUT = timedelta(minutes=60)
#: gradient bytes per all-reduce (DDP's default bucket size)
BUCKET_BYTES = 25 * 2**20

#: the cross-entropy's own units with ``latents.write`` (its means then also cover the written
#: template): the intact path's tokens, the corrupted path's, both pooled, the template's
CE_UNITS = ("intact_ce_tokens", "corrupted_ce_tokens", "ce_tokens", "template_tokens")
ALL_UNITS = (*UNITS, *CE_UNITS)


@dataclass(frozen=True)
class World:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        return cls(
            int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
        )

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The recipe's device; with several processes on CUDA, this rank's GPU ``LOCAL_RANK``."""
        device = torch.device(name)
        if device.type == "cuda" and self.size > 1:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def step_seed(self, seed: int, step: int) -> int:
        """The torch seed of a step on this rank: a single process's on rank 0; on the others
        offset by ``rank * 2**40`` (beyond any seed a run derives), so that ranks do not repeat
        each other's dropout masks."""
        return derived_seed(seed, step) + (self.rank << 40)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks (in place)."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def micro_batches(self, batch_size: int, accum: int) -> list[slice]:
        """This rank's contiguous shard of a global batch, cut into ``accum`` micro-batches."""
        per_rank = batch_size // self.size
        per_micro = per_rank // accum
        start = self.rank * per_rank
        return [slice(start + i * per_micro, start + (i + 1) * per_micro) for i in range(accum)]


@contextmanager
def process_group(world: World, device: str) -> Iterator[None]:
    """Join the launcher's process group (NCCL on CUDA, gloo on CPU) unless one is already
    initialised; destroy it on a normal exit if it was created here. After an error the process
    just exits (destroying would wait for ranks that wait for this one) and the launcher stops
    the others."""
    created = world.size > 1 and not dist.is_initialized()
    if created:
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    yield
    if created:
        dist.destroy_process_group()


def broadcast_module(module: nn.Module, world: World) -> None:
    """Copy rank 0's trainable parameters and buffers to every rank (as DDP does at construction),
    so a nondeterministic initialisation cannot make the replicas diverge.

    Frozen parameters (a LoRA run's base) are not sent: every rank reads them from the same
    checkpoint, memory-mapped, so the ranks of a node share one copy in the page cache, which a
    broadcast into them would turn into a private copy per rank (or they come from the recipe's
    seeded init, which a LoRA checkpoint's base fingerprint already requires to be reproducible).
    That every rank holds rank 0's base is checked by comparing those fingerprints instead."""
    if world.size == 1:
        return
    trainable = [p for p in module.parameters() if p.requires_grad]
    for tensor in [*trainable, *module.buffers()]:
        dist.broadcast(tensor.data, 0)
    if len(trainable) == len(list(module.parameters())):
        return
    bases: list[str | None] = [None] * world.size
    dist.all_gather_object(bases, base_fingerprint(module))
    other = next((rank for rank, base in enumerate(bases) if base != bases[0]), None)
    if other is not None:
        raise UsageError(
            f"backbone: rank {other} built other frozen weights than rank 0; every process must "
            "load the same checkpoint (is name_or_path another revision on its node?)"
        )


def all_reduce_gradients(params: Iterable[nn.Parameter], world: World) -> None:
    """Sum the gradients over ranks in flat buckets of ``BUCKET_BYTES``. Every rank runs the same
    graph on its rows, so every rank holds gradients for the same parameters in the same order."""
    if world.size == 1:
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in (p.grad for p in params if p.grad is not None):
        nbytes = grad.numel() * grad.element_size()
        fits = bucket and bucket[0].dtype == grad.dtype and bucket[0].device == grad.device
        if bucket and (not fits or size + nbytes > BUCKET_BYTES):
            _reduce(bucket)
            bucket, size = [], 0
        bucket.append(grad)
        size += nbytes
    if bucket:
        _reduce(bucket)


def _reduce(bucket: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in bucket])
    dist.all_reduce(flat)
    for grad, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
        grad.copy_(part.view_as(grad))


def unit_counts(layout: Layout) -> torch.Tensor:
    """How many of each of :data:`ALL_UNITS` a layout holds, float64 ``[7]``."""
    answers = layout.answer_targets() != IGNORE_INDEX
    tokens = int(answers.sum())
    written = layout.written_counts()
    intact, corrupted, shared = (written.get(k, 0) for k in ("intact", "corrupted", "shared"))
    two_paths = layout.has(Segment.CORRUPTED)
    on_corrupted = tokens + corrupted if two_paths else 0
    counts = [
        tokens,
        answers.any(-1).sum(),
        len(layout),
        tokens + intact + shared,
        on_corrupted + (shared if two_paths else 0),
        tokens + intact + on_corrupted + shared,
        intact + corrupted + shared,
    ]
    return torch.tensor([float(c) for c in counts], dtype=torch.float64)


class ShardLoss:
    """Rescales a micro-batch's loss and terms (means over its own rows) to its share of the
    global-batch mean, so that summing over micro-batches and ranks gives the single-process
    values. Relies on ``total = CE part + sum_i weight_i * objective_i`` (see
    :mod:`crystalkit.crystal.method`), where every cross-entropy is a mean over tokens: the
    answer tokens, or with ``latents.write`` the tokens of :data:`CE_UNITS`."""

    def __init__(self, method: Method):
        self.units: dict[str, str] = {
            k: "answer_tokens" for k in ("ce", "ce_intact", "ce_corrupted")
        }
        #: the unit of the CE part of the total
        self.ce_unit = "answer_tokens"
        if method.packer.write:
            placement = method.recipe.crystal.ce if method.crystal else "intact"
            self.ce_unit = {"intact": "intact_ce_tokens", "corrupted": "corrupted_ce_tokens"}.get(
                placement, "ce_tokens"
            )
            self.units = {
                "ce": self.ce_unit,
                "ce_intact": "intact_ce_tokens",
                "ce_corrupted": "corrupted_ce_tokens",
                "ce_template": "template_tokens",
            }
        if method.perceive:  # per-cell means over every cell: a mean over samples
            self.ce_unit = "samples"
            self.units = {
                "perceive": "samples",
                **{f"perceive_{a}": "samples" for a in method.vocab},
            }
        self.trains: dict[str, bool] = {}
        for key, _, objective, trains in method.objectives:
            self.units[key] = objective_units(objective)
            self.trains[key] = trains

    def __call__(
        self,
        total: torch.Tensor,
        terms: dict[str, torch.Tensor],
        counts: torch.Tensor,
        global_counts: torch.Tensor,
        weights: dict[str, float],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, terms)`` scaled by ``counts / global_counts`` of each term's unit: the CE part
        by the share of the tokens its mean covers (the answer tokens; with ``latents.write``
        those and the written template's), each objective (weighted by ``weights``, this step's) by its
        own (an exact identity when all shares are 1, so one process on one batch computes what it
        always did)."""
        share = {
            unit: float(counts[i] / global_counts[i]) if global_counts[i] > 0 else 0.0
            for i, unit in enumerate(ALL_UNITS)
        }
        base = share[self.ce_unit]
        loss = base * total
        for key, trains in self.trains.items():
            value = terms[key] if trains else terms[key].detach()
            loss = loss + weights[key] * value * (share[self.units[key]] - base)
        scaled = {key: value.detach() * share[self.units[key]] for key, value in terms.items()}
        return loss, scaled


class Replicas:
    """Data parallelism with a whole model on every rank (also the single-process case)."""

    #: whether every rank must take part in a forward (then all ranks evaluate, rank 0 writes)
    collective_forward = False

    def __init__(self, world: World):
        self.world = world

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        broadcast_module(model, self.world)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def sync(self, model: nn.Module) -> None:
        all_reduce_gradients(model.parameters(), self.world)

    def clip(self, model: nn.Module, max_norm: float | None) -> float:
        """Clip the global gradient norm to ``max_norm`` (``None``: don't) and return it."""
        norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), max_norm if max_norm is not None else float("inf")
        )
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def checkpoint_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, dict[str, Any]]:
        """What rank 0 saves: a module whose ``state_dict`` holds the full weights, and the
        optimizer state."""
        return model, optimizer.state_dict()

    def load_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        optimizer.load_state_dict(state)


class Sharded(Replicas):
    """FSDP2: parameters, gradients and optimizer state sharded over the ranks. Checkpoints hold
    the full (gathered) weights and optimizer state, so a run resumes on any number of ranks."""

    collective_forward = True

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        from transformers.modeling_layers import GradientCheckpointingLayer

        super().prepare(model, device)
        mesh = init_device_mesh(device.type, (self.world.size,))
        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for block in reversed(blocks):  # innermost first
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # the one method outside forward that reads weights (the embedding matrix, the vision
        # tower's patch embedding and merger): every embedding call goes through it
        register_fsdp_forward_method(model, "embed_inputs")
        # FSDP warns at every forward that returns a view (hidden_states[0] is a slice of the
        # packed embeddings) because an in-place op on it would skip a hook; none is done here
        warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP averages gradients over ranks; the shard losses are made to be summed
        (loss * self.world.size).backward()

    def sync(self, model: nn.Module) -> None:
        """Nothing left: FSDP reduce-scattered the gradients during backward."""

    def checkpoint_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)  # empty on ranks > 0
        names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        for tied in names.values():
            if len(tied) > 1 and tied[0] in weights:
                # one tensor, as in the model, with a storage of its own (not FSDP's padded one)
                weights.update(dict.fromkeys(tied, weights[tied[0]].clone()))
        return _StateDict(weights), get_optimizer_state_dict(model, optimizer, options=options)

    def load_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, state, options=options)


class _StateDict(nn.Module):
    """Stands in for a sharded model where a checkpoint reads ``state_dict()``."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return dict(self._state)


def data_parallel(recipe: Recipe, world: World) -> Replicas:
    """The recipe's kind of data parallelism; bad combinations are a :class:`UsageError`."""
    cfg = recipe.train
    parts = world.size * cfg.grad_accum_steps
    if cfg.batch_size % parts:
        raise UsageError(
            f"train.batch_size: {cfg.batch_size} (the global batch) is not divisible by "
            f"{world.size} processes x train.grad_accum_steps {cfg.grad_accum_steps} = {parts}"
        )
    if not cfg.fsdp:
        return Replicas(world)
    two_pass = recipe.method == "crystal" and recipe.crystal.strategy == "two_pass"
    unsupported = [
        (world.size == 1, "needs several processes (torchrun --nproc_per_node N, N > 1)"),
        (
            two_pass,
            "not supported with crystal.strategy=two_pass (its gradients reach the intact pass "
            "through the copied keys/values, which FSDP's backward hooks do not see); use packed",
        ),
        (
            recipe.latents.train_new_rows_only,
            "not supported with latents.train_new_rows_only (its gradient hooks sit on the "
            "unsharded parameters)",
        ),
        (
            recipe.lora.enabled,
            "not supported with lora.enabled (a LoRA run keeps its frozen base on every rank: "
            "use plain data parallelism, train.fsdp=false)",
        ),
        (
            cfg.precision == "fp16",
            "not supported with train.precision=fp16 (loss scaling would skip steps per "
            "shard); use bf16",
        ),
    ]
    for bad, why in unsupported:
        if bad:
            raise UsageError(f"train.fsdp: {why}")
    return Sharded(world)
