"""A stage script under DeepSpeed in CPU processes, for tests: `torchrun ... tests/deepspeed_cpu.py SCRIPT ARGS`.

DeepSpeed 0.19.8 itself trains on CPU over gloo (DS_ACCELERATOR=cpu). Two things in front of it do not, and this
launcher (tests only, never the scripts) changes them:

- accelerate 1.15 `PartialState._prepare_backend` finds no backend for a DeepSpeed run without an accelerator device
  (CUDA, XPU, NPU, ...): the state then counts 1 process while DeepSpeed counts 2, and ZeRO's batch-size check fails
  (`train_batch_size ... 4 != 2 * 1 * 1`). Here it answers gloo, as it does for `use_cpu` runs.
- the scripts set `use_cpu` when there is no GPU (medicalgpt.parser), and `use_cpu` makes accelerate skip DeepSpeed
  altogether (the model is then ZeRO-3-partitioned at load but trained as plain DDP). Here that default is off.

tests/train/test_scaleout.py::test_deepspeed_cpu_launcher_patches_what_it_expects fails when either seam moves.
"""

import os
import runpy
import sys

from accelerate.state import DistributedType, PartialState

_prepare_backend = PartialState._prepare_backend


def prepare_backend_with_gloo_for_deepspeed(self, cpu=False, sagemaker_dp=False, backend=None):
    backend, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if backend is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "gloo", DistributedType.MULTI_CPU
    return backend, distributed_type


def patch():
    import medicalgpt.parser

    PartialState._prepare_backend = prepare_backend_with_gloo_for_deepspeed
    medicalgpt.parser._default_to_cpu = lambda values: None


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    script = sys.argv[1]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    patch()
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    # The script has finished (its outputs saved, the process group left). Interpreter teardown after a DeepSpeed
    # run on CPU processes (DeepSpeed 0.19.8, torch 2.13, gloo) now and then aborts one rank with "terminate called
    # without an active exception" (a C++ thread destroyed while joinable), failing a run that succeeded; seen in
    # ~1 of 10 stage runs here. Leave without that teardown. Tests only: GPU runs use NCCL and the scripts as they are.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
