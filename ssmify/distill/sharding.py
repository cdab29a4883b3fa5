"""FSDP2 for distillation: accelerate's FSDP plugin on CPU processes, and a sharded frozen teacher.

accelerate (1.x) builds its FSDP state only for accelerator devices: launched with an FSDP config on CPU
(ACCELERATE_USE_CPU=true, gloo), it leaves the plugin out and silently trains with DDP instead.
`fsdp_plugin_for_stage` switches that state to the plugin the launch config describes, so a CPU launch runs
accelerate's own FSDP2 code paths (`fully_shard` per unit in `prepare`, gradient-sync control, DTensor
gradient clipping, sharded `save_state`/`load_state`, the full state dict gathered on the main process),
the ones a GPU launch runs; only the device (CPU) and the backend (gloo) differ. This is how the shipped
recipes/accelerate/fsdp.yaml is run by the tests, with 2 CPU processes.

`shard_teacher` is FSDP2 for the teacher, which no optimizer touches: each decoder layer and the root are
`fully_shard`ed with reshard_after_forward, so a process holds 1/N of the teacher's weights plus, during
its forward, one gathered layer at a time. It only runs forward, under no_grad; every process must
call it equally often, which the stage loop does (the same micro batches and validation passes on each).
"""

from __future__ import annotations

import logging

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from torch import nn

from ssmify.errors import SsmifyError

logger = logging.getLogger(__name__)


def fsdp_plugin_for_stage(accelerator: Accelerator) -> None:
    """Under an FSDP launch, give this stage a fresh FSDP plugin read from the launch config.

    accelerate keeps one plugin per process, and its first `prepare` fixes the plugin's wrap classes (the
    first stage's objective's `_no_split_modules`), which a later stage's objective does not have; a fresh
    plugin per stage wraps each stage's own units. On CPU processes it also switches accelerate from its
    DDP fallback to FSDP (see the module docstring). A no-op for every other launch.
    """
    state = accelerator.state
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return
    cpu = state.distributed_type == DistributedType.MULTI_CPU
    if state.distributed_type != DistributedType.FSDP and not cpu:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launch config's FSDP_* variables, as accelerate does
    if cpu and plugin.fsdp_version != 2:
        raise SsmifyError(
            f"accelerate config: fsdp_version {plugin.fsdp_version} on CPU processes; "
            "only FSDP2 (fsdp_version: 2) runs on CPU"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    if cpu:
        state.distributed_type = DistributedType.FSDP
        # What accelerate's AcceleratorState does for FSDP: the process state says it too, else the next
        # AcceleratorState() (the optimizer wrapper makes one) copies MULTI_CPU back.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if accelerator.is_main_process:
            logger.info("FSDP%d on %d CPU processes (gloo)", plugin.fsdp_version, accelerator.num_processes)


def shard_teacher(teacher: nn.Module, state: PartialState) -> nn.Module:
    """The frozen teacher on `state.device`, sharded over the processes with FSDP2 when there are several.

    Each decoder layer, then the root (embeddings, final norm, head), is `fully_shard`ed with
    reshard_after_forward, so outside a forward a process holds 1/N of every weight. Call it with the
    teacher still on CPU: `fully_shard` moves one layer at a time to the device and cuts it to its shard
    there, so the whole teacher is never on one device. With one process there is nothing to shard
    across; the teacher stays whole (a warning says so).
    """
    teacher.requires_grad_(False).eval()
    if state.num_processes == 1:
        logger.warning(
            "teacher_sharding: fsdp with 1 process: nothing to shard across; the teacher stays whole"
        )
        return teacher.to(state.device)
    from torch.distributed.fsdp import fully_shard

    from ssmify.convert.adapters import get_adapter

    for layer in get_adapter(teacher.config.model_type).decoder_layers(teacher):
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(teacher, reshard_after_forward=True)
    if state.is_main_process:
        logger.info("teacher sharded with FSDP2 over %d processes", state.num_processes)
    return teacher
