"""A model whose weights come from the checkpoint one part at a time: fill a part, use it, let it go.

    lazy = LazyModel.open(path)               # parameters on the meta device: no weight memory yet
    lazy.model.to(torch.float16)              # the dtype the parts will have (meta parameters just change dtype)
    lazy.materialize(("vpm.", "resampler."))  # read from the checkpoint, in that dtype
    ...                                       # trace, run
    lazy.release(("vpm.", "resampler."))      # back on the meta device, memory freed

Each tensor is read in its stored dtype (bfloat16 for real checkpoints), copied into float32 (the conversion
`load_model` makes) and cast to the parameter's dtype (what `model.to(dtype)` does after a full load), so a part
holds exactly the values of a fully loaded model, and only one stored tensor is held besides the part.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from minicpm.checkpoint import TIED_HEAD, LoadReport, TensorReader, load_skeleton
from minicpm.modeling import MiniCPMV


@dataclass
class LazyModel:
    model: MiniCPMV  # parameters on the meta device until materialized
    reader: TensorReader
    report: LoadReport  # what the checkpoint holds (checked strictly from its headers)
    sources: dict[str, str]  # parameter name -> checkpoint key, where they differ (a tied head reads the table)

    @classmethod
    def open(cls, path: str | os.PathLike) -> LazyModel:
        model, reader, report = load_skeleton(path)
        tied = model.config.llm.tie_word_embeddings
        return cls(model, reader, report, {TIED_HEAD: "llm.model.embed_tokens.weight"} if tied else {})

    def stored(self, name: str) -> torch.Tensor:
        """Parameter `name` as the checkpoint stores it (dtype included); drop it once converted."""
        return self.reader.get(self.sources.get(name, name))

    def read(self, name: str) -> torch.Tensor:
        """Parameter `name` as float32, as `load_model` holds it."""
        stored = self.stored(name)
        return torch.empty(stored.shape, dtype=torch.float32).copy_(stored)

    def materialize(self, prefixes: tuple[str, ...], skip: Iterable[str] = ()) -> None:
        """Read every parameter under `prefixes` (but the names in `skip`) into its current dtype."""
        skip = set(skip)
        for name, module, attr in self._parameters(prefixes):
            if name not in skip:
                dtype = module._parameters[attr].dtype
                module._parameters[attr] = nn.Parameter(self.read(name).to(dtype), requires_grad=False)

    def release(self, prefixes: tuple[str, ...]) -> None:
        """Put every parameter under `prefixes` back on the meta device (shape and dtype kept)."""
        for _, module, attr in self._parameters(prefixes):
            param = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(param.to("meta"), requires_grad=False)
        gc.collect()  # the exporter's traces hold cycles that reference the part's tensors
        return_freed_memory()

    def _parameters(self, prefixes: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
        """(name, owning module, attribute) of the parameters under `prefixes`; a tied one under each of its names."""
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False) if n.startswith(prefixes)]
        return [(n, self.model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names]


def return_freed_memory() -> None:
    """glibc keeps freed heap pages (the parts' tensors, onnxruntime's arenas) in the process, where the next part
    cannot always reuse them; malloc_trim hands them back to the system. A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
