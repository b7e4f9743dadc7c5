"""Exporters: trace the submodule split into ONNX, Core ML and ExecuTorch graphs plus one manifest.json."""
