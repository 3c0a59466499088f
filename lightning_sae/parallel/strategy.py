"""Lightning's ModelParallelStrategy on a data x latent mesh, with sharded checkpoints.

:class:`LatentParallelStrategy` is ``ModelParallelStrategy(data_parallel_size=world /
latent_parallel, tensor_parallel_size=latent_parallel)``: Lightning builds the 2-D device mesh
(``"data_parallel"``, ``"tensor_parallel"``; gloo on CPU, NCCL on GPU), launches the processes
and calls the module's ``configure_model``, where the sharded layer slices the dictionary
(``parallel/sharded.py``).

Checkpoints are torch distributed checkpoints (a folder): every per-latent tensor and its Adam
state is saved as a DTensor sharded over the latent dimension, so each rank writes only its
slice and the folder loads into any mesh (DCP reshards on load), or into one process through
:func:`~lightning_sae.parallel.checkpoint.consolidate_checkpoint`. Everything else (loops,
callbacks, schedulers, hyperparameters) goes to ``meta.pt`` as in Lightning's own layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim import Optimizer

from lightning_sae.files import METADATA_LIMIT, load_torch_file
from lightning_sae.parallel.checkpoint import META_FILENAME, check_dcp_metadata
from lightning_sae.parallel.layers import check_shardable, sharded_class
from lightning_sae.parallel.sharded import shard_of


class LatentParallelStrategy(ModelParallelStrategy):
    """Data parallel x latent parallel: ``latent_parallel`` devices share one dictionary.

    Args:
        latent_parallel: devices per latent group; it must divide the device count
            (``trainer.devices`` x ``trainer.num_nodes``) and ``model.init_args.d_sae``.
            The remaining factor is the data-parallel size.
        **kwargs: ``ModelParallelStrategy``'s ``process_group_backend`` and ``timeout``.
    """

    def __init__(self, latent_parallel: int = 1, **kwargs: Any) -> None:
        if not isinstance(latent_parallel, int) or latent_parallel < 1:
            raise ValueError(
                f"latent_parallel must be a positive integer, got {latent_parallel!r}: set "
                "trainer.latent_parallel."
            )
        super().__init__(tensor_parallel_size=latent_parallel, **kwargs)
        self.latent_parallel = latent_parallel

    def _check_mesh(self) -> None:
        devices = self.num_nodes * self.num_processes
        if devices % self.latent_parallel:
            raise ValueError(
                f"trainer.latent_parallel={self.latent_parallel} does not divide the "
                f"{devices} devices (trainer.devices x trainer.num_nodes): the mesh is data "
                "parallel x latent parallel, so set trainer.latent_parallel to a divisor of "
                f"{devices} or change trainer.devices."
            )

    def _configure_launcher(self) -> None:
        self._check_mesh()  # when the Trainer is built, before any process starts
        super()._configure_launcher()

    def setup_environment(self) -> None:
        self._check_mesh()
        devices = self.num_nodes * self.num_processes
        self._data_parallel_size = devices // self.latent_parallel
        module = self.lightning_module
        check_shardable(module, self.latent_parallel)
        super().setup_environment()
        # The sharded layer's configure_model slices the weights once the mesh exists.
        module.__class__ = sharded_class(type(module))

    def setup(self, trainer: Any) -> None:
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "norm":
            # Lightning's clipping takes the norm of the local tensors: each member would clip
            # by its own slice's norm, not the dictionary's.
            raise ValueError(
                "trainer.gradient_clip_val with gradient_clip_algorithm 'norm' is not supported "
                "with latent sharding (each member would clip by its own slice's norm): set "
                "trainer.gradient_clip_algorithm: value, or trainer.latent_parallel: 1."
            )
        super().setup(trainer)

    # ----------------------------------------------------------------- checkpoints
    def _wrap(self, name: str, tensor: Tensor) -> Tensor:
        module = self.lightning_module
        if shard_of(module) is None or name not in module.sharded_dims(module):
            return tensor
        dim, view = module.sharded_dims(module)[name]
        local = tensor if view is None else tensor.view(view)  # a view: loads land in place
        return DTensor.from_local(
            local, self.device_mesh, [Replicate(), Shard(dim)], run_check=False
        )

    def _viewed(self) -> dict[str, list[int]]:
        """The flat tensors saved through a view, with their one-process shapes, for
        :func:`~lightning_sae.parallel.checkpoint.consolidate_checkpoint` to restore."""
        module = self.lightning_module
        if shard_of(module) is None:
            return {}
        state = module.state_dict()
        return {
            name: [state[name].numel() * module.shard.latent_size]
            for name, (_, view) in module.sharded_dims(module).items()
            if view is not None and name in state
        }

    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = self.lightning_module.state_dict()
        return {name: self._wrap(name, tensor) for name, tensor in state.items()}

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        names = {id(p): name for name, p in self.lightning_module.named_parameters()}
        state = {
            names[id(p)]: {
                key: self._wrap(names[id(p)], value) if value.dim() else value
                for key, value in param_state.items()
            }
            for p, param_state in optimizer.state.items()
        }
        return {"state": state, "param_groups": param_groups_by_name(optimizer, names)}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(self.broadcast(filepath))
        if self.global_rank == 0:
            if path.is_file():
                path.unlink()
            path.mkdir(parents=True, exist_ok=True)
        self.barrier()
        optimizers = checkpoint.pop("optimizer_states", [])
        viewed = self._viewed()
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        tensors |= {f"optimizer_{i}": {"state": o["state"]} for i, o in enumerate(optimizers)}
        dcp.save(tensors, checkpoint_id=path)
        if self.global_rank == 0:
            checkpoint["optimizer_param_groups"] = [o["param_groups"] for o in optimizers]
            checkpoint["latent_parallel"] = self.latent_parallel
            checkpoint["viewed_tensors"] = viewed
            torch.save(checkpoint, path / META_FILENAME)
        self.barrier()

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not (path / META_FILENAME).is_file():
            raise ValueError(
                f"{path} is not a latent-sharded checkpoint folder (no {META_FILENAME}). A sharded "
                "run resumes from a folder its strategy wrote (any mesh shape); a one-process "
                "checkpoint trains on as it was trained (trainer.latent_parallel: 1)."
            )
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
        for optimizer in optimizers:
            _create_adam_state(optimizer)
        tensors = {"state_dict": self.lightning_module_state_dict()}
        tensors |= {
            f"optimizer_{i}": {"state": self.optimizer_state(o)["state"]}
            for i, o in enumerate(optimizers)
        }
        # torch unpickles the index and any bytes entry: a downloaded folder could run code, or
        # leave out a tensor that the in-place load would then silently keep from this run.
        check_dcp_metadata(path, expected=_flat_shapes(tensors))
        dcp.load(tensors, checkpoint_id=path)  # in place: the DTensors view the live tensors
        meta = load_torch_file(path / META_FILENAME, METADATA_LIMIT, what="checkpoint's meta.pt")
        for optimizer, groups in zip(
            optimizers, meta.get("optimizer_param_groups", []), strict=False
        ):
            for group, saved in zip(optimizer.param_groups, groups, strict=True):
                group.update({k: v for k, v in saved.items() if k != "params"})
        return meta


def _flat_shapes(tree: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Size]:
    """Global shape of every tensor of a nested dict, under the name torch's distributed
    checkpoint gives it (the keys on the way, joined by dots)."""
    shapes: dict[str, torch.Size] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            shapes |= _flat_shapes(value, f"{name}.")
        elif isinstance(value, Tensor):
            shapes[name] = value.shape  # a DTensor's shape is the global one
    return shapes


def _create_adam_state(optimizer: Optimizer) -> None:
    """Adam's per-parameter state, zero, so that a checkpoint can be loaded into it in place."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p)


def param_groups_by_name(optimizer: Optimizer, names: dict[int, str]) -> list[dict[str, Any]]:
    """The optimizer's parameter groups (lr, betas, ...) with each parameter given by its name in
    the module, as a checkpoint stores them (``names``: ``id(parameter)`` -> name)."""
    return [
        {
            **{k: v for k, v in group.items() if k != "params"},
            "params": [names[id(p)] for p in group["params"]],
        }
        for group in optimizer.param_groups
    ]
