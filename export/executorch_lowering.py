"""Lowering the exported methods to one ExecuTorch program (XNNPACK or the Core ML delegate), the edge passes that
keep XNNPACK's partitions whole, and what the summary reports of it (delegation per method, bytes per method)."""

from __future__ import annotations

import contextlib
import gc
import io
import math
import warnings

import torch

from export.bundle import quiet_loggers
from export.executorch_modules import METHODS
from minicpm.lazy_model import return_freed_memory

# the exporters' loggers whose progress chatter our progress bar replaces
LOGGERS = ("torch.export", "torch._dynamo", "torch._export", "executorch", "coremltools", "torchao", "root")
LINEAR_OPS = ("aten_linear_default", "aten_mm_default", "aten_addmm_default")  # edge node names


def partitioners(backend: str, dtype: torch.dtype, names: list[str]) -> dict[str, list]:
    """The delegate's partitioner for each method."""
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: PLC0415

        return {name: [XnnpackPartitioner()] for name in names}
    import coremltools as ct  # noqa: PLC0415
    from executorch.backends.apple.coreml.compiler import CoreMLBackend  # noqa: PLC0415
    from executorch.backends.apple.coreml.compiler.coreml_preprocess import (  # noqa: PLC0415
        MULTIMETHOD_WEIGHT_SHARING_STRATEGY,
    )
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner  # noqa: PLC0415

    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=ct.target.iOS18,  # int4 blockwise weights need iOS 18
        compute_precision=ct.precision.FLOAT32 if dtype == torch.float32 else ct.precision.FLOAT16)
    # Vision and decoder are different networks: positional weight sharing (for twins) does not apply.
    specs.append(CoreMLBackend.generate_multimethod_weight_sharing_strategy_compile_spec(
        MULTIMETHOD_WEIGHT_SHARING_STRATEGY.DISABLED))
    # The KV cache stays an ExecuTorch buffer (shared, named, zeroable) rather than a Core ML state, so the
    # program keeps the XNNPACK program's contract; Core ML runs the compute between the cache writes, which
    # stay portable ops (coremltools 9.0 cannot convert an index_put at a runtime position).
    coreml = CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=False,
                               skip_ops_for_coreml_delegation=["aten.index_put.default"])
    # The embedding lookup (dynamic length, a memcpy) stays a portable op.
    return {name: [] if name == "token_embedding" else [coreml] for name in names}


def lower_each(programs: dict, backend: str, metadata: dict, dtype: torch.dtype):
    """to_edge_transform_and_lower (for XNNPACK after `XNNPACK_PASSES`) + to_executorch, one method at a
    time, emptying `programs`: once a method's delegates hold their serialised copy of its weights, the traced ones
    are dropped, so the lowering's copies of one method's weights coexist with its traced ones, not every method's.
    `to_edge_transform_and_lower` partitions each method alone anyway. -> (ExecutorchProgramManager, the edge
    manager)."""
    from executorch.exir import (  # noqa: PLC0415
        EdgeCompileConfig,
        EdgeProgramManager,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )
    from executorch.exir.passes import MemoryPlanningPass  # noqa: PLC0415

    config = EdgeCompileConfig(_check_ir_validity=False)
    lowered = {}
    chatter = contextlib.redirect_stderr(io.StringIO()) if backend == "coreml" else contextlib.nullcontext()
    with warnings.catch_warnings(), quiet_loggers(*LOGGERS), chatter:
        warnings.simplefilter("ignore")
        for name in list(programs):
            edge = to_edge_transform_and_lower({name: programs.pop(name)}, compile_config=config,
                                               transform_passes=XNNPACK_PASSES if backend == "xnnpack" else None,
                                               partitioner=partitioners(backend, dtype, [name]))
            lowered[name] = edge.exported_program(name)
            del edge
            _drop_traced_weights(lowered[name])
        edge = EdgeProgramManager(lowered, constant_methods=metadata, compile_config=config)
        del lowered
        program = edge.to_executorch(ExecutorchBackendConfig(
            # The cache buffers get their own memory, shared by every method (decoder methods share one state).
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
            emit_mutable_buffer_names=True,  # hosts find (and may zero) the state buffers by name
            run_reinplace_pass=True,  # cache writes in place, not a copy of the whole buffer per call
        ))
    return program, edge


def _drop_traced_weights(program) -> None:
    """Replace the weights a lowered method's delegates were traced from with one-element stand-ins of their shape
    and dtype (strides 0): each delegate keeps its subgraph with these tensors, a second copy of what it serialised,
    and to_executorch only propagates shapes through it (on fake tensors: meta ones would not mix with them)."""
    from executorch.exir.backend.utils import get_delegates  # noqa: PLC0415

    for node in get_delegates(program.graph):
        original = getattr(program.graph_module, node.target).original_module
        for store in (original.state_dict, original.constants):
            for key, value in store.items():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    stand_in = torch.zeros((), dtype=value.dtype).expand(value.shape)
                    store[key] = torch.nn.Parameter(stand_in, requires_grad=False) \
                        if isinstance(value, torch.nn.Parameter) else stand_in
    gc.collect()
    return_freed_memory()


def drop_noop_expands(graph_module: torch.fx.GraphModule):
    """Edge pass: remove `expand_copy` nodes whose output has their input's shape (identities that split the XNNPACK
    partition, see XNNPACK_PASSES)."""
    from executorch.exir.dialects._ops import ops as exir_ops  # noqa: PLC0415
    from executorch.exir.pass_base import PassResult  # noqa: PLC0415

    dropped = 0
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target == exir_ops.edge.aten.expand_copy.default:
            source = node.args[0]
            if tuple(source.meta["val"].shape) == tuple(node.meta["val"].shape):
                node.replace_all_uses_with(source)
                graph_module.graph.erase_node(node)
                dropped += 1
    graph_module.recompile()
    return PassResult(graph_module, dropped > 0)


def mean_as_pooling(graph_module: torch.fx.GraphModule):
    """Edge pass: `mean(x, [-1], keepdim=True)` as view [1, rows, n, 1] + mean over the last two axes (a global
    average pool, which XNNPACK takes) + view back (see XNNPACK_PASSES). One dynamic axis (a prefill's token
    count) becomes the views' single inferred -1, the only symbolic size XNNPACK's reshape takes."""
    from executorch.exir.dialects._ops import ops as exir_ops  # noqa: PLC0415
    from executorch.exir.pass_base import PassResult  # noqa: PLC0415

    view, mean = exir_ops.edge.aten.view_copy.default, exir_ops.edge.aten.mean.dim
    changed = False
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target != mean:
            continue
        source, axes = node.args[0], list(node.args[1])
        shape = list(source.meta["val"].shape)
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dynamic = [i for i, n in enumerate(shape) if not isinstance(n, int)]
        if axes not in ([-1], [len(shape) - 1]) or not keepdim or node.kwargs.get("dtype") is not None \
                or len(dynamic) > 1 or len(shape) - 1 in dynamic:
            continue
        pooled = [1, -1 if dynamic else math.prod(shape[:-1]), shape[-1], 1]
        kept = [-1 if i in dynamic else n for i, n in enumerate(node.meta["val"].shape)]
        with graph_module.graph.inserting_before(node):
            flat = graph_module.graph.call_function(view, (source, pooled))
            flat.meta["val"] = view(source.meta["val"], pooled)
            pool = graph_module.graph.call_function(mean, (flat, [-1, -2], True))
            pool.meta["val"] = mean(flat.meta["val"], [-1, -2], True)
            back = graph_module.graph.call_function(view, (pool, kept))
            back.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(back)
        graph_module.graph.erase_node(node)
        changed = True
    graph_module.recompile()
    return PassResult(graph_module, changed)


# Edge passes before XNNPACK's partitioner, each replacing ops it does not take: every such op cuts a method into
# more delegate subgraphs, each preprocessed through ~17 graph passes (export time grows with their count) and each a
# separate delegate call at run time.
XNNPACK_PASSES = [drop_noop_expands, mean_as_pooling]


def delegation(edge, backend_id: str) -> dict[str, dict]:
    """Per method: delegated subgraphs / nodes, nodes left to portable kernels, and how many of the matrix
    products with a weight (linear / mm / addmm nodes) run inside a delegate."""
    from executorch.devtools.backend_debug import get_delegation_info  # noqa: PLC0415

    out = {}
    for name in sorted(edge.methods, key=METHODS.index):
        gm = edge.exported_program(name).graph_module
        info = get_delegation_info(gm)
        by_op = info.delegation_by_operator
        backends = sorted({getattr(gm, n.target).backend_id for n in gm.graph.nodes
                           if n.op == "get_attr" and n.target.startswith("lowered_module")})
        if backends and backends != [backend_id]:
            raise RuntimeError(f"{name}: delegated to {backends}, expected {backend_id}")
        out[name] = {"subgraphs": info.num_delegated_subgraphs, "delegated_nodes": info.num_delegated_nodes,
                     "portable_nodes": info.num_non_delegated_nodes,
                     "linear_delegated": sum(by_op[op].delegated for op in LINEAR_OPS if op in by_op),
                     "linear_ops": sum(by_op[op].delegated + by_op[op].non_delegated for op in LINEAR_OPS
                                       if op in by_op),
                     "backends": backends}
    return out


def method_bytes(edge) -> dict[str, int]:
    """Bytes each method brings to the program: its delegate blobs, the named weights they reference and the
    constants its portable ops read (weights shared between methods count for each of them)."""
    out = {}
    for name in edge.methods:
        program = edge.exported_program(name)
        gm, signature = program.graph_module, program.graph_signature
        named, total = {}, 0
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target.startswith("lowered_module"):
                lowered = getattr(gm, node.target)
                total += len(lowered.processed_bytes)
                store = lowered.named_data_store_output
                for key, entry in (store.pte_data if store is not None else {}).items():
                    named[key] = len(store.buffers[entry.buffer_index])
        mutated = set(signature.buffers_to_mutate.values())
        constants = {**signature.inputs_to_parameters, **signature.inputs_to_lifted_tensor_constants,
                     **{k: v for k, v in signature.inputs_to_buffers.items() if v not in mutated}}
        tensors = {**program.state_dict, **program.constants}
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node.name in constants and node.users:
                value = tensors.get(constants[node.name])
                total += value.nbytes if isinstance(value, torch.Tensor) else 0
        out[name] = total + sum(named.values())
    return out
