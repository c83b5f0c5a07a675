"""
common/dist.py: one process or many. Where this process sits (`Dist`), the process group under torchrun,
FSDP2 sharding, the collectives the stages use (all_gather, all_sum, barrier), and the arithmetic of which
rows each rank takes. With `python FILE.py` the world is one process and none of it communicates.
"""
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from common.models import default_device

log = logging.getLogger("dist")

@dataclass
class Dist:
    """Where this process sits. `python FILE.py` is rank 0 of 1 and nothing distributed runs; under torchrun
    (RANK, WORLD_SIZE, LOCAL_RANK in the environment) the collectives below use the default process group."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def this_process() -> Dist:
    """Where this process sits, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def init_processes(device: str = "") -> tuple[Dist, str]:
    """(Dist, device) for this process; starts the process group under torchrun and says once how the run is
    laid out."""
    device = device or default_device()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        log.info("one process, device %s", device)
        return Dist(), device
    import torch.distributed as dist
    d = this_process()
    if device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if d.main:
        log.info("world size %d, rank %d, local rank %d, backend %s, device %s", d.world, d.rank,
                 d.local_rank, dist.get_backend(), device)
    else:
        logging.getLogger().setLevel(logging.WARNING)  # one voice: rank 0 logs, the others only warn
    return d, device


def shard(model, d: Dist, device: str):
    """FSDP2: every decoder layer and then the whole model sharded over the ranks (bf16 compute with fp32
    reductions on GPU, fp32 on CPU). One process: the model as it is."""
    if d.world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.startswith("cuda") else None)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp or MixedPrecisionPolicy())
    fully_shard(model, mp_policy=mp or MixedPrecisionPolicy())
    return model


def full_state_dict(model, d: Dist, everywhere: bool = False) -> dict:
    """The unsharded weights: on rank 0 (on CPU), or on every rank with `everywhere` (for a weight push)."""
    if d.world == 1:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))


def all_gather(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if d.world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: dict, d: Dist) -> dict:
    """Every value summed over the ranks (same keys on every rank)."""
    if d.world == 1:
        return dict(values)
    return {k: sum(v[k] for v in all_gather(values, d)) for k in values}


def barrier(d: Dist):
    if d.world > 1:
        import torch.distributed as dist
        dist.barrier()


def my_share(n: int, d: Dist) -> range:
    """This rank's contiguous part of range(n): the ranks' parts differ in size by at most one."""
    per, extra = divmod(n, d.world)
    start = d.rank * per + min(d.rank, extra)
    return range(start, start + per + (d.rank < extra))


def micro_batches(rows: list[int], size: int, count: int) -> list[list[int]]:
    """`rows` cut into `count` micro-batches of at most `size`; the last ones may be empty. Every rank of a
    sharded model runs the same number of forward passes (each one is a collective), so short ranks run empty
    ones."""
    return [rows[i * size:(i + 1) * size] for i in range(count)]


def n_micro_batches(largest_share: int, size: int) -> int:
    return max(1, -(-largest_share // size))




def minibatch_layout(tokens: list[int], n_minibatches: int, micro_batch_size: int, d: Dist):
    """How a step's kept rows (their response-token counts in `tokens`, in order) go through PPO.

    The rows are cut into n_minibatches contiguous mini-batches; each rank takes every world-th row of each.
    Returns (local, forward_passes, layout):
      local:          this rank's rows (positions in `tokens`), mini-batch after mini-batch;
      forward_passes: forward passes per pass over all of this rank's rows (the same on every rank);
      layout:         per mini-batch (positions in `local`, the mini-batch's token count over all ranks,
                      forward passes of that mini-batch)."""
    minibatches = np.array_split(np.arange(len(tokens)), n_minibatches)
    mine = [mb[d.rank::d.world].tolist() for mb in minibatches]
    local = [i for rows in mine for i in rows]
    largest = sum(len(mb[0::d.world]) for mb in minibatches)  # rank 0 has the most
    offsets = np.cumsum([0] + [len(rows) for rows in mine])
    layout = [(list(range(offsets[k], offsets[k + 1])), sum(tokens[i] for i in mb),
               n_micro_batches(len(mb[0::d.world]), micro_batch_size))
              for k, mb in enumerate(minibatches)]
    return local, n_micro_batches(largest, micro_batch_size), layout
