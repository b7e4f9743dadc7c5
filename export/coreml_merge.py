"""One multifunction Core ML package from single-function packages, without loading their weights.

    merge_packages({"prefill": Path("prefill.mlpackage"), "decode": Path("decode.mlpackage")}, out, default="decode")

coremltools' `save_multifunction` loads every function's whole MIL program with its weights as numpy arrays,
deduplicates them and serialises again: for a full-size V-4.0 LLM (two functions over 3.3 B int4 weights) that
took the export from 6.9 to 14.1 GiB (measured). The merge works on the model specs (protobuf) and the blob files
instead: the first package's weight file is copied as it is, every blob another function references is read, hashed
(sha256 of its type and bytes) and let go, one at a time; one already stored is referenced at its offset, any other
(a shape-specific constant) is appended once. Memory stays at about one blob.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")
# MIL data types -> the suffix of libmilstoragepython's read_* / write_* methods
BLOB_TYPES = {"FLOAT16": "fp16", "FLOAT32": "float", "INT8": "int8", "UINT8": "uint8", "INT4": "int4",
              "UINT4": "uint4", "INT16": "int16", "UINT16": "uint16", "INT32": "int32", "UINT32": "uint32",
              "UINT1": "uint1", "UINT2": "uint2", "UINT3": "uint3", "UINT6": "uint6"}


def blob_values(function) -> list:
    """Every value of a MIL function that lives in the weight file: consts' `val`, and op arguments given as
    values (constexpr ops take theirs so), nested blocks included."""
    values = []

    def walk(block) -> None:
        for op in block.operations:
            if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue":
                values.append(op.attributes["val"])
            for binding in op.inputs.values():
                values.extend(arg.value for arg in binding.arguments
                              if arg.HasField("value") and arg.value.WhichOneof("value") == "blobFileValue")
            for inner in op.blocks:
                walk(inner)

    walk(function.block_specializations[function.opset])
    return values


def merge_packages(parts: dict[str, Path], path: Path, default: str) -> None:
    """Write the multifunction package `path` whose functions are the `main` functions of `parts` (name ->
    single-function package), sharing the weights they have in common; `default` is the default function."""
    import coremltools as ct  # noqa: PLC0415
    from coremltools.libmilstoragepython import _BlobStorageReader, _BlobStorageWriter  # noqa: PLC0415
    from coremltools.libmodelpackage import ModelPackage  # noqa: PLC0415
    from coremltools.proto import MIL_pb2, Model_pb2  # noqa: PLC0415

    names = list(parts)
    specs = {name: ct.utils.load_spec(str(parts[name])) for name in names}
    shutil.copytree(parts[names[0]], path)  # the first package's weight file is the shared one
    merged = Model_pb2.Model()
    merged.CopyFrom(specs[names[0]])

    def kind(value) -> str:
        return BLOB_TYPES[MIL_pb2.DataType.Name(value.type.tensorType.dataType)]

    def key(reader, value) -> tuple[str, bytes]:
        """A blob by its type and contents (read one at a time, hashed, let go)."""
        data = getattr(reader, f"read_{kind(value)}_data")(value.blobFileValue.offset)
        return kind(value), hashlib.sha256(np.ascontiguousarray(data).tobytes()).digest()

    base = _BlobStorageReader(str(parts[names[0]] / WEIGHTS))
    stored = {key(base, v): v.blobFileValue.offset for v in blob_values(specs[names[0]].mlProgram.functions["main"])}
    writer = _BlobStorageWriter(str(path / WEIGHTS), truncate_file=False)
    functions = {names[0]: specs[names[0]].mlProgram.functions["main"]}
    for name in names[1:]:
        function = specs[name].mlProgram.functions["main"]
        reader = _BlobStorageReader(str(parts[name] / WEIGHTS))
        for value in blob_values(function):
            blob = key(reader, value)
            if blob not in stored:  # a constant of this function's own (shapes differ): appended once
                data = getattr(reader, f"read_{kind(value)}_data")(value.blobFileValue.offset)
                stored[blob] = getattr(writer, f"write_{kind(value)}_data")(data)
            value.blobFileValue.offset = stored[blob]
        functions[name] = function
    del writer  # closes the weight file
    merged.mlProgram.ClearField("functions")  # renamed (a function may keep the name "main")
    for name in names:
        merged.mlProgram.functions[name].CopyFrom(functions[name])

    description = merged.description
    functions = []
    for name in names:
        single = specs[name].description
        functions.append(Model_pb2.FunctionDescription(
            name=name, input=single.input, output=single.output, state=single.state,
            predictedFeatureName=single.predictedFeatureName,
            predictedProbabilitiesName=single.predictedProbabilitiesName))
    for field in ("input", "output", "state"):
        description.ClearField(field)
    description.ClearField("predictedFeatureName")
    description.ClearField("predictedProbabilitiesName")
    description.functions.extend(functions)
    description.defaultFunctionName = default
    merged.specificationVersion = max(merged.specificationVersion, 9)  # iOS 18: multifunction models
    Path(ModelPackage(str(path)).getRootModel().path()).write_bytes(merged.SerializeToString())
