"""int4 weight quantisation (AWQ and round-to-nearest) with format-neutral records every exporter writes.

    from quant import QuantConfig, awq_quantize, save_records
    result = awq_quantize(model, calibration, QuantConfig(group_size=128))
    save_records("quant_records.safetensors", result.records, result.config)

`result.model` runs the quantised weights in PyTorch; `result.records` maps each quantised layer's
qualified name to its codes / scales / zeros (w = (codes - zeros) * scales) and optional input scale.
"""

from quant.config import QuantConfig
from quant.quantize import QuantResult, awq_quantize, rtn_quantize
from quant.records import QuantRecord, load_records, save_records

__all__ = ["QuantConfig", "QuantRecord", "QuantResult", "awq_quantize", "load_records", "rtn_quantize", "save_records"]
