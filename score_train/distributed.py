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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from score_train import checkpoint as ck
from score_train.model import CausalLM


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init(timeout_s: float = 600.0, device: str | None = None) -> DistInfo:
    """Start the process group when launched by torchrun; otherwise a single-process DistInfo on `device`
    ("auto"/None: a GPU if there is one)."""
    want_cuda = torch.cuda.is_available() if device in (None, "auto") else str(device).startswith("cuda")
    if not launched_by_torchrun():
        return DistInfo(device=torch.device(device if device not in (None, "auto") else "cuda" if want_cuda else "cpu"))
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


def _decoder_layers(model: torch.nn.Module):
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "model"):
        layers = getattr(model.model, "layers", None)
    if layers is None:
        raise ValueError("shard: the model has no .layers (or .model.layers) to shard per decoder layer")
    return layers


def prepare(model: torch.nn.Module, ref: torch.nn.Module | None, info: DistInfo, cut: int, *, engine: str,
            activation_checkpointing: bool = False, shard_ref: bool = True) -> int:
    """Shard the policy (and the reference unless replicated) for a torchrun run; a no-op in one process.
    Returns the first trainable layer to run the frozen prefix from (0 under FSDP: every layer through the
    model's own forward, one unshard per layer per pass)."""
    if not info.enabled:
        return cut
    if engine != "engine":
        raise ValueError("distributed training needs rollout.engine=engine")
    shard(model, activation_checkpointing=activation_checkpointing)
    if isinstance(ref, torch.nn.Module) and shard_ref:  # not a model.BaseView: that is the policy itself
        shard(ref)
    return 0


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
    # the root stays gathered after forward: the (tied) lm_head is used by the fused log-prob op right after
    fully_shard(model, **dict(kw, reshard_after_forward=False))
    # Mark the root now: generation calls the layers without the root's forward, and FSDP would otherwise
    # lazily make each layer a root of its own and refuse the root's first training forward later.
    model._get_fsdp_state()._lazy_init()
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
            m.set_reshard_after_forward(m is not model)  # as shard() set them


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


def all_mean_metrics(metrics: dict[str, float], info: DistInfo, *, sum_keys=(), keep=("step",)) -> dict:
    """Scalar metrics over ranks: the mean (ranks hold equal prompt shares), or the sum for counts and
    throughputs (`sum_keys`); `keep` and non-numeric values stay as rank 0 has them."""
    if not info.enabled or not metrics:
        return metrics
    keys = sorted(k for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keep)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    if info.device.type == "cuda":
        t = t.to(info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    red = {k: (v if k in sum_keys else v / info.world_size) for k, v in zip(keys, t.tolist())}
    return dict(metrics, **red)


def global_count(local: int | torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Global policy-token (or sequence) count for `policy_loss(global_token_count=...)`."""
    return all_sum(local, info).to(torch.float32)


def grad_scale(info: DistInfo) -> float:
    """FSDP averages gradients over ranks; a loss normalised by the *global* count must be summed, so scale it."""
    return float(info.world_size) if info.enabled else 1.0


def pad_passes(batches: list, info: DistInfo) -> list:
    """The same number of forward/backward passes on every rank (FSDP's collectives run per pass): a rank with
    fewer micro-batches gets None entries, which the caller replays with zero weight. Unchanged in one process."""
    return batches + [None] * (all_max(len(batches), info) - len(batches))


def shard_prompts(n_prompts: int, info: DistInfo) -> range:
    """Contiguous prompt shard of this rank. All n samples of one prompt stay on one rank (group baselines need no
    communication). Requires n_prompts % world_size == 0 so every rank runs the same number of steps."""
    if n_prompts % info.world_size:
        raise ValueError(f"prompts_per_step={n_prompts} must be divisible by world_size={info.world_size}")
    per = n_prompts // info.world_size
    return range(info.rank * per, (info.rank + 1) * per)


def all_max(x: int, info: DistInfo) -> int:
    if not info.enabled:
        return int(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of `obj` on every rank (run directory names, resume state)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ----------------------------------------------------------------------------- checkpoints
# Same layout as score_train.checkpoint (ckpt_dir/step_XXXXXX with a COMPLETE marker written last, then an
# atomic rename), but the model and optimiser go through torch.distributed.checkpoint: every rank writes its own
# shards, and loading reshards to any number of ranks (1 included, even without torchrun).

def save_checkpoint(ckpt_dir: str, step: int, model: torch.nn.Module, optimizer, state: dict, info: DistInfo, *,
                    keep: int = 2) -> str:
    import json
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.path.join(ckpt_dir, f"step_{step:06d}")
    tmp = f"{final}.tmp-dist"  # one name on every rank: they all write into it
    if info.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        for d in os.listdir(ckpt_dir):  # leftovers of a crash mid-save
            if ".tmp-" in d:
                shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
        os.makedirs(tmp)
    barrier(info)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    barrier(info)
    if info.is_main:
        torch.save(ck.rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(state, step=step, world_size=info.world_size), f, indent=1)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in ck.complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def save(ckpt_dir: str, step: int, model: torch.nn.Module, optimizer, state: dict, info: DistInfo, *,
         keep: int = 2) -> str:
    """A checkpoint of this run: sharded (torch.distributed.checkpoint) under torchrun, else the
    single-process safetensors layout of score_train.checkpoint. Either loads on any number of ranks."""
    if info.enabled:
        return save_checkpoint(ckpt_dir, step, model, optimizer, state, info, keep=keep)
    return ck.save(ckpt_dir, step, model, optimizer, state, keep=keep)


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, ".metadata"))


def load_checkpoint(path: str, model: torch.nn.Module, optimizer) -> dict:
    """Loads a save_checkpoint directory into a model sharded over any number of ranks (or not sharded)."""
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ck.set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=False))
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def full_state_dict(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The full, unsharded model state on CPU on rank 0 (other ranks get {}), for the Hugging Face export."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if info.is_main else {}


def export_hf(model: torch.nn.Module, path: str, tokenizer, info: DistInfo, *, adapter_path: str | None = None) -> None:
    """Gathers the full state on rank 0 and writes a Hugging Face directory from an unsharded CPU copy (LoRA
    adapters merged in); `adapter_path`: also the peft adapter directory (model.save_lora_adapter)."""
    if not is_sharded(model):
        if info.is_main:
            model.save_pretrained(path, tokenizer=tokenizer)
            if adapter_path:
                model.save_lora_adapter(adapter_path)
        return
    sd = full_state_dict(model, info)
    if info.is_main:
        with torch.device("meta"):
            plain = CausalLM(model.config)
            if model.has_lora:  # the same adapters, so the gathered names and shapes land
                plain.add_lora(model.lora_config.r, model.lora_config.lora_alpha, model.lora_from_layer)
        missing, _ = plain.load_state_dict(sd, strict=False, assign=True)
        if missing:
            raise RuntimeError(f"export_hf: the gathered state lacks {missing[:4]}")
        plain.inv_freq = model.inv_freq.detach().cpu()
        plain.save_pretrained(path, tokenizer=tokenizer)
        if adapter_path:
            plain.save_lora_adapter(adapter_path)
    barrier(info)
