"""FSDP2 sharded training (`train.distributed=fsdp`): the model is split over the ranks, not copied.

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` to every decoder block (the classes a
transformers model names in ``_no_split_modules``, else the blocks of its layer list), then to the
root: each rank keeps 1/N of every tensor, frozen base and adapter alike, and a block's full weights
exist only while it runs (gathered before its forward and again for its backward, gradient
checkpointing included). One FSDP parameter group may mix frozen and trainable tensors and dtypes:
only tensors with a gradient are reduce-scattered. Mixed precision follows ``train.precision``:
parameters are gathered in the compute dtype (bf16 / fp16; fp32: as stored) while the adapter's
sharded master weights, its optimizer state and the gradient reduction stay fp32.

QLoRA (FSDP-QLoRA): a 4-bit base is loaded with ``quant_storage`` = the compute dtype, so its packed
weights are ordinary tensors of that dtype that shard and gather like any other (``prepare_config``
sets it); bitsandbytes keeps each layer's quantization state on the module, where the gathered weight
finds it again.

Gradients are SUMMED over ranks (divide factor 1): the loop already divides the loss by the token
count of the whole global batch, exactly as the ddp path's all-reduce does, so N ranks with
``grad_accum=k`` take the steps of one process with ``grad_accum=N·k``.

Checkpoints (``save_sharded`` / ``load_sharded``) keep the adapter's tensors and the optimizer state
through ``torch.distributed.checkpoint``: each rank writes its own shards, and loading reshards onto
any number of ranks. The PEFT-format adapter is gathered (``full_adapter_tensors``, every rank takes
part) and written once by rank 0, so `peftctl merge` and peft read it unchanged.

Every collective in here is entered by every rank in the same order (all ranks run the same
forwards: the same number of micro-batches per step, evaluation on every rank).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from peftctl.adapters.core.persistence import adapter_key_map
from peftctl.models.modules import find_hf_model

SHARDED_DIR = "sharded"  # the torch.distributed.checkpoint folder inside checkpoints/step-N
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def uses_fsdp(cfg: Any) -> bool:
    return cfg.train.distributed == "fsdp"


def prepare_config(cfg: Any) -> None:
    """FSDP-QLoRA: 4-bit weights stored in the compute dtype (``quant.quant_storage=compute``), so the
    packed tensors shard and the mixed-precision cast of a gather leaves them unchanged."""
    if uses_fsdp(cfg) and cfg.quant.method in ("nf4", "fp4"):
        cfg.quant.quant_storage = "compute"


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: modules of the classes the transformers model lists in
    ``_no_split_modules`` (its decoder / encoder layers), else the children of its largest ModuleList."""
    hf_model = find_hf_model(model)
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    largest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(largest)


def mixed_precision(precision: str) -> Any:
    """FSDP2's policy: gather in the compute dtype (None: as stored), reduce gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=COMPUTE_DTYPES.get(precision), reduce_dtype=torch.float32)


def shard_model(model: nn.Module, precision: str, device: torch.device) -> int:
    """fully_shard every decoder block, then the root, over all ranks on ``device`` (a CPU-loaded model's
    tensors move to the device block by block); gradients are summed. Returns the number of blocks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # the root returns logits that the loss slices (views) but never changes in place; FSDP2 warns on every step
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(precision)
    blocks = decoder_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    _sum_gradients_over_ranks(model)
    return len(blocks)


def _sum_gradients_over_ranks(model: nn.Module) -> None:
    """FSDP2 averages gradients by default; the loop's loss is already normalised by the global batch.
    Divide factor 1 through plain SUM reductions (gloo has no pre-multiplied sum)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):  # older torch: NCCL's pre-multiplied sum
                module.set_force_sum_reduction_for_comms(True)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (the tensor itself otherwise): checks that need no collective."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_adapter_tensors(model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's whole tensors under PEFT's names, as ``get_adapter_state_dict`` gives them, on every
    rank (one gather per tensor, in the same order on every rank: call it on every rank)."""
    state = model.state_dict(keep_vars=False)
    tensors = {}
    for ours, peft_key in adapter_key_map(model, adapter_name).items():
        value = state[ours]
        value = value.full_tensor() if isinstance(value, DTensor) else value
        tensors[peft_key] = value.detach().cpu().contiguous()
    return model.method_of(adapter_name).state_dict_for_save(model, adapter_name, tensors)


def _state_options(strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)  # the base comes from model.name_or_path


def _sharded_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options())
    return {"model": model_state, "optimizer": optimizer_state}


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where the ranks write a checkpoint's shards before rank 0 moves them into the checkpoint folder
    (a temporary name that clean_torn_writes removes if the run is killed in between)."""
    return run_dir / "checkpoints" / f".step-{step:06d}.{SHARDED_DIR}.tmp"


def clear_staging(directory: Path) -> None:
    """Rank 0, before the ranks write: an earlier attempt's leftovers go."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def save_shards(directory: Path, model: nn.Module, optimizer: Any) -> None:
    """Every rank writes its shards of the trainable tensors and the optimizer state (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(directory))


def move_shards_into(staging: Path, checkpoint_tmp: Path) -> None:
    os.replace(staging, checkpoint_tmp / SHARDED_DIR)


def load_shards(checkpoint: Path, model: nn.Module, optimizer: Any) -> None:
    """Every rank reads its shards (resharded to this run's number of ranks) into model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_DIR))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_state_options(strict=False),  # the frozen base is not in it; dcp.load found every trainable key
    )


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / SHARDED_DIR).is_dir()
