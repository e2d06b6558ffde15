"""Run a stage script (argv[1], its overrides after it) under `accelerate launch` with FSDP allowed on CPU.

accelerate 1.15 turns an FSDP config into FSDP only for GPU-class distributed types (`AcceleratorState.__init__` in
accelerate/state.py); on CPU it keeps MULTI_CPU, i.e. plain DDP. PyTorch's FSDP2 (`fully_shard`) itself runs on CPU
over gloo, so this lifts that one gate and nothing else: the stage, the Trainer, accelerate's FSDP2 preparation and
its state-dict gathering all run as they would on GPUs. For tests only (tests/stages/test_launch.py).
"""

import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__
_plugin = []


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None:
        _plugin[:] = [fsdp_plugin]
    # Every later (re-)initialisation of the shared state too, or the Trainer would see MULTI_CPU again on save.
    if _plugin and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugin[0]


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
