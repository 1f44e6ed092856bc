"""make install's last step: build DeepSpeed's CPU ops (shared-memory comm, Adam) once, into TORCH_EXTENSIONS_DIR,
so that neither the first run nor the first test spends minutes compiling them. With CUDA there is nothing to do here:
DeepSpeed builds its GPU ops where they run."""

import deepspeed
import torch
from deepspeed.ops.op_builder import FusedAdamBuilder

if not torch.cuda.is_available():
    FusedAdamBuilder().load()
    deepspeed.get_accelerator().create_op_builder("ShareMemCommBuilder").load()
