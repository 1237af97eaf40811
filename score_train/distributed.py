"""torchrun + FSDP2 for score-train: PyTorch's own engine, no home-made distributed layer.

- `init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and starts NCCL on GPUs or
  gloo on CPUs with a collective timeout, so a dead rank ends the job instead of hanging it.
- `shard(model)` applies `fully_shard` per decoder layer, then to the root (bf16 params, fp32 reductions on GPU).
- `gathered(model)` keeps the full weights materialised for generation (one all-gather per layer per rollout,
  not per decode step) and frees them after.
- `all_ok(error)` is the error barrier every rank passes after rollouts: a failure on one rank raises on all,
  carrying that rank's message.
- Loss normalisation is global (`global_count`); the per-rank loss is a share of the global sum, so gradients are
  summed, not averaged, across ranks (`GRAD_SCALE`).
- Checkpoints go through torch.distributed.checkpoint (sharded; resumable on a different number of ranks).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init(timeout_s: float = 600.0, device: str | None = None) -> DistInfo:
    """Start the process group when launched by torchrun; otherwise a single-process DistInfo."""
    want_cuda = torch.cuda.is_available() if device in (None, "auto") else str(device).startswith("cuda")
    if not launched_by_torchrun():
        return DistInfo(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if want_cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _decoder_layers(model: torch.nn.Module):
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "model"):
        layers = getattr(model.model, "layers", None)
    if layers is None:
        raise ValueError("shard: the model has no .layers (or .model.layers) to shard per decoder layer")
    return layers


def shard(model: torch.nn.Module, *, mixed_precision: bool | None = None, activation_checkpointing: bool = False,
          reshard_after_forward: bool = True) -> torch.nn.Module:
    """FSDP2 (`fully_shard`) per decoder layer, then the root. On GPU, bf16 params with fp32 reductions."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    on_gpu = next(model.parameters()).is_cuda
    mp = None
    if mixed_precision if mixed_precision is not None else on_gpu:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {"reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kw["mp_policy"] = mp
    layers = _decoder_layers(model)
    for i, layer in enumerate(layers):
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            layer = checkpoint_wrapper(layer)
            layers[i] = layer
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Full (unsharded) weights for the duration of generation; freed after. No-op when not sharded."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def all_ok(error: BaseException | None, info: DistInfo) -> None:
    """Error barrier after rollouts: if any rank failed, every rank raises with the failing ranks' messages."""
    if not info.enabled:
        if error is not None:
            raise error
        return
    msg = "" if error is None else f"rank {info.rank}: {type(error).__name__}: {error}"
    msgs: list = [None] * info.world_size
    dist.all_gather_object(msgs, msg)
    failed = [m for m in msgs if m]
    if failed:
        raise RuntimeError("rollout failed on " + "; ".join(failed)) from error


def all_sum(x: torch.Tensor | float, info: DistInfo) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu").clone()
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_mean_metrics(metrics: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of scalar metrics over ranks (each rank's metrics weigh the same: ranks hold equal prompt shares)."""
    if not info.enabled or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    if info.device.type == "cuda":
        t = t.to(info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist())}


def global_count(local: int | torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Global policy-token (or sequence) count for `policy_loss(global_token_count=...)`."""
    return all_sum(local, info).to(torch.float32)


def grad_scale(info: DistInfo) -> float:
    """FSDP averages gradients over ranks; a loss normalised by the *global* count must be summed, so scale it."""
    return float(info.world_size) if info.enabled else 1.0


def shard_prompts(n_prompts: int, info: DistInfo) -> range:
    """Contiguous prompt shard of this rank. All n samples of one prompt stay on one rank (group baselines need no
    communication). Requires n_prompts % world_size == 0 so every rank runs the same number of steps."""
    if n_prompts % info.world_size:
        raise ValueError(f"prompts_per_step={n_prompts} must be divisible by world_size={info.world_size}")
    per = n_prompts // info.world_size
    return range(info.rank * per, (info.rank + 1) * per)


# ----------------------------------------------------------------------------- checkpoints
def save_sharded(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 extra: dict | None = None) -> None:
    """torch.distributed.checkpoint save (each rank writes its shards); `extra` (step, stage, rng, ...) is saved by
    rank 0 as JSON-able data inside the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": msd}
    if optimizer is not None:
        state["optim"] = osd
    dcp.save(state, checkpoint_id=path)
    if extra is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        torch.save(extra, os.path.join(path, "extra.pt"))
    if dist.is_initialized():
        dist.barrier()


def load_sharded(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict | None:
    """Loads a save_sharded checkpoint into a model sharded over any number of ranks (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": msd}
    if optimizer is not None:
        state["optim"] = osd
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    extra = os.path.join(path, "extra.pt")
    return torch.load(extra, weights_only=False) if os.path.exists(extra) else None


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded model state on CPU (on rank 0; other ranks get {}), for the Hugging Face export."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else {}
