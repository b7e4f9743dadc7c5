"""The MiniCPM-V / MiniCPM-o model family in PyTorch: configs, modules, checkpoints, preprocessing, prompts.

Everything else in this project (exporters, quantisation, runtime, iOS bundle) imports from here.
"""

import logging

# torchao (installed with executorch, imported by transformers) logs its missing CUDA kernels and torch
# deprecation notes on import: noise on a CPU machine, and it would bury our one-line errors.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from minicpm.checkpoint import Checkpoint, load_model, resolve_model, save_model
from minicpm.config import VARIANTS, MiniCPMConfig, Variant
from minicpm.errors import UserError
from minicpm.generation import GenerationResult, SamplingConfig, generate
from minicpm.modeling import MiniCPMV

__all__ = [
    "VARIANTS", "Checkpoint", "GenerationResult", "MiniCPMConfig", "MiniCPMV", "SamplingConfig", "UserError",
    "Variant", "generate", "load_model", "resolve_model", "save_model",
]
