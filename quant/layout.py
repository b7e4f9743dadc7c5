"""Where the Linears are: transformer block lists, which Linears get int4, and which op absorbs each AWQ scale.

A *scale group* is a set of Linears reading the same input. AWQ multiplies their weight columns by s and
must divide their common input by s; `prev` says who does the division:

* a norm (RMSNorm / LayerNorm): its weight (and bias) are divided by s, for free;
* a Linear whose output feeds the group through linear ops only (v_proj -> o_proj through attention,
  up_proj -> down_proj through the gated product): its output rows are divided by s, for free;
* nothing (an activation such as GELU sits in between): the layer keeps an explicit `input_scale` = 1/s,
  one per-channel multiply at run time.

Known block layouts are listed by module name below; any other block is split into groups of Linears
that receive the very same input tensor, each with an explicit input scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from quant.config import QuantConfig

# (prev, linears) per group, names relative to one block; prev None = explicit input scale.
LayoutTable = list[tuple[str | None, list[str]]]
KNOWN_LAYOUTS: dict[str, LayoutTable] = {
    # Also Qwen3.5's full-attention layers (MiniCPM-V 4.6 / 4.7): q_proj's extra gate rows and the sigmoid gate on
    # the attention output are per-channel products, so v_proj -> o_proj stays linear (unscaled under GQA).
    "llama/qwen2/qwen3 decoder": [
        ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("self_attn.v_proj", ["self_attn.o_proj"]),
        ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
        ("mlp.up_proj", ["mlp.down_proj"]),
    ],
    # Qwen3.5's gated delta-net layers (linear attention; MiniCPM-V 4.6 / 4.7).
    "qwen3.5 gated delta-net decoder": [
        # the four projections read input_layernorm's output, which feeds nothing else (the residual takes its input)
        ("input_layernorm", ["linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
                             "linear_attn.in_proj_a"]),
        # out_proj reads RMSNormGated(core, z): one weight per head channel shared by every head, times silu(z);
        # no per-channel scale over all heads fits in it, and silu is not linear: an explicit input scale
        (None, ["linear_attn.out_proj"]),
        ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
        ("mlp.up_proj", ["mlp.down_proj"]),  # through silu(gate) * up: linear in up's rows
    ],
    "siglip/idefics2 encoder": [
        ("layer_norm1", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("self_attn.v_proj", ["self_attn.out_proj"]),
        ("layer_norm2", ["mlp.fc1"]),
        (None, ["mlp.fc2"]),  # GELU between fc1 and fc2
    ],
    "whisper encoder": [
        ("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("self_attn.v_proj", ["self_attn.out_proj"]),
        ("final_layer_norm", ["fc1"]),
        (None, ["fc2"]),  # GELU between fc1 and fc2
    ],
    # BERT is post-norm: the LayerNorm before q/k/v (and before intermediate.dense) also feeds the
    # residual, so it cannot absorb a scale; those groups keep explicit input scales.
    "bert": [
        (None, ["attention.self.query", "attention.self.key", "attention.self.value"]),
        ("attention.self.value", ["attention.output.dense"]),
        (None, ["intermediate.dense"]),
        (None, ["output.dense"]),  # GELU between intermediate.dense and output.dense
    ],
}


# Groups in a pre-norm block's last residual branch (block output = residual + branch(x), the residual untouched
# by the trial): their block-output error is exactly the branch's output error, so the alpha search runs only
# the branch (first Linear of the group -> branch module). Checked at run time against the block (quant.search).
LAST_BRANCH: dict[str, dict[str, str]] = {
    "llama/qwen2/qwen3 decoder": {"mlp.gate_proj": "mlp", "mlp.down_proj": "mlp.down_proj"},
    "qwen3.5 gated delta-net decoder": {"mlp.gate_proj": "mlp", "mlp.down_proj": "mlp.down_proj"},
    "siglip/idefics2 encoder": {"mlp.fc1": "mlp", "mlp.fc2": "mlp.fc2"},
    "whisper encoder": {"fc2": "fc2"},
}

# Linears of a known layout left in full precision by default, with the reason (they still take their group's
# scale in full precision, so the group's other members can be scaled).
KEPT_FLOAT: dict[str, dict[str, str]] = {
    "qwen3.5 gated delta-net decoder": {
        name: "delta-net gate projection (one row per value head: its decay / write strength compounds over every "
              "later token of the recurrent state, for a negligible share of the weights)"
        for name in ("linear_attn.in_proj_b", "linear_attn.in_proj_a")},
}


@dataclass
class ScaleGroup:
    """Linears (names relative to their block) sharing one input, and how 1/s reaches that input."""

    linears: list[str]
    prev: str | None = None  # a norm or a Linear in the same block; None = explicit input scale
    kind: str = "explicit"  # "norm", "linear", "explicit", or "none" (not scaled, see `reason`)
    reason: str = ""
    branch: str | None = None  # the residual branch whose output error equals the block's (LAST_BRANCH)

    def describe(self) -> str:
        if self.kind in ("norm", "linear"):
            return f"folded into {self.prev}"
        return "explicit input scale" if self.kind == "explicit" else f"not scaled ({self.reason})"


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm-like: a per-channel `weight` multiplying a normalised input (checked numerically
    when a scale is folded, see quant.scaling.fold_into_norm)."""
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or (
        name.endswith(("RMSNorm", "LayerNorm")) and isinstance(getattr(module, "weight", None), nn.Parameter))


def known_layout(block: nn.Module) -> tuple[str, list[ScaleGroup]] | None:
    """The named layout whose Linears are exactly the block's Linears, with GQA-aware prev checks."""
    modules = dict(block.named_modules())
    linears = {n for n, m in modules.items() if isinstance(m, nn.Linear)}
    for layout_name, table in KNOWN_LAYOUTS.items():
        if {lin for _, group in table for lin in group} != linears:
            continue
        if any(prev is not None and prev not in modules for prev, _ in table):
            continue
        groups = []
        for prev, names in table:
            if prev is None:
                groups.append(ScaleGroup(names))
                continue
            source = modules[prev]
            widths = {modules[n].in_features for n in names}
            if isinstance(source, nn.Linear):
                if widths != {source.out_features}:
                    # Grouped-query attention: v_proj has fewer outputs than o_proj has inputs.
                    groups.append(ScaleGroup(names, prev, "none", f"{prev} has {source.out_features} outputs, "
                                                                  f"{names[0]} has {widths.pop()} inputs (GQA)"))
                else:
                    groups.append(ScaleGroup(names, prev, "linear"))
            elif is_norm(source):
                groups.append(ScaleGroup(names, prev, "norm"))
            else:
                groups.append(ScaleGroup(names))
        for group in groups:
            group.branch = LAST_BRANCH.get(layout_name, {}).get(group.linears[0])
        return layout_name, groups
    return None


# ---------------------------------------------------------------------------------------------------------
# What gets quantised
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BlockList:
    """One list of transformer blocks: its path and (qualified-name prefix, block) pairs in order."""

    path: str
    blocks: list[tuple[str, nn.Module]]

    @classmethod
    def at(cls, model: nn.Module, path: str) -> BlockList:
        module = model.get_submodule(path) if path else model
        prefix = f"{path}." if path else ""
        if isinstance(module, nn.ModuleList):
            return cls(path, [(f"{prefix}{i}.", block) for i, block in enumerate(module)])
        return cls(path, [(prefix, module)])  # a single module (or the whole model) is its own block


@dataclass
class Plan:
    """The model's block lists (in execution order) and the fate of every Linear and Embedding."""

    block_lists: list[BlockList]
    int4: dict[str, nn.Linear] = field(default_factory=dict)  # quantised to int4, by qualified name
    kept: dict[str, str] = field(default_factory=dict)  # left in full precision: name -> reason
    int8: dict[str, nn.Module] = field(default_factory=dict)  # lm_head / embeddings with int8 records


HYBRID_LLM_BLOCKS = "model.language_model.layers"  # MiniCPM-V 4.6 / 4.7: the Qwen3.5 text layers


def is_hybrid(model: nn.Module) -> bool:
    """MiniCPM-V 4.6 / 4.7, built from transformers' own classes (minicpm.v4_6)."""
    from minicpm.v4_6 import HYBRID_MODEL_TYPES  # noqa: PLC0415

    return getattr(getattr(model, "config", None), "model_type", None) in HYBRID_MODEL_TYPES


def _has_linear(module: nn.Module, prefix: str, config: QuantConfig) -> bool:
    return any(isinstance(m, nn.Linear) and not config.skipped_by(f"{prefix}{n}")
               for n, m in module.named_modules())


def find_block_lists(model: nn.Module, config: QuantConfig) -> list[str]:
    """Paths of the transformer block lists, in execution order.

    `config.blocks` when given; for MiniCPM-V 4.6 / 4.7 the Qwen3.5 text layers; for MiniCPMV the LLM layers
    (after the vision layers when quantize_vision and the Whisper encoder layers when quantize_audio); otherwise
    the longest ModuleList of same-type modules holding a quantisable Linear, or the model itself when it has none.
    """
    if config.blocks is not None:
        for path in config.blocks:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise UserError(f"blocks: {type(model).__name__} has no submodule {path!r}") from None
            if not any(isinstance(m, nn.Linear) for m in module.modules()):
                raise UserError(f"blocks: {path!r} contains no Linear layers")
        return list(config.blocks)
    if is_hybrid(model):
        if config.quantize_vision or config.quantize_audio:
            # the ViT's merger sits between two encoder layers and changes the token count: block-by-block replay
            # of the vision layers is not built for it yet
            raise UserError("quantize_vision / quantize_audio: MiniCPM-V 4.6 / 4.7 quantise the language model only "
                            "(the vision encoder stays float)")
        return [HYBRID_LLM_BLOCKS]
    if isinstance(model, MiniCPMV):
        if config.quantize_audio and not hasattr(model, "apm"):
            raise UserError(f"quantize_audio: {model.config.variant.name} has no audio encoder (MiniCPM-o only)")
        return ((["vpm.encoder.layers"] if config.quantize_vision else [])
                + (["apm.layers"] if config.quantize_audio else []) + ["llm.model.layers"])
    best, best_len = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) <= best_len:
            continue
        if len({type(m) for m in module}) == 1 and _has_linear(module, f"{name}." if name else "", config):
            best, best_len = name, len(module)
    return [best] if best is not None else [""]


def _hf_modules(model: nn.Module, getter: str) -> set[int]:
    """ids of the modules that transformers models inside `model` report through `getter`."""
    found = set()
    for module in model.modules():
        method = getattr(module, getter, None)
        if not callable(method):
            continue
        try:
            target = method()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        if isinstance(target, nn.Module):
            found.add(id(target))
    return found


def _heads_and_embeddings(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names of the output heads (Linears called lm_head, or a transformers model's output embeddings) and of
    the token embeddings (a transformers model's input embeddings; every nn.Embedding when none says so)."""
    heads, token_embeddings = _hf_modules(model, "get_output_embeddings"), _hf_modules(model, "get_input_embeddings")
    named = list(model.named_modules())
    head_names = {n for n, m in named if isinstance(m, nn.Linear) and (n.split(".")[-1] == "lm_head" or id(m) in heads)}
    embedding_names = {n for n, m in named if isinstance(m, nn.Embedding) and id(m) in token_embeddings}
    if not embedding_names:
        embedding_names = {n for n, m in named if isinstance(m, nn.Embedding)}
    return head_names, embedding_names


def _check_tied(model: nn.Module, plan: Plan) -> None:
    """A weight shared by an int8 module and a full-precision one (tied lm_head / embeddings) cannot be both."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            owners.setdefault(id(module.weight), []).append(name)
    for names in owners.values():
        if len(names) > 1 and len({n in plan.int8 for n in names}) > 1:
            raise UserError(f"{' and '.join(names)} share one weight (tied embeddings): give lm_head and "
                            "embeddings the same setting")


def make_plan(model: nn.Module, config: QuantConfig) -> Plan:
    """Decide, for every Linear and Embedding of `model`, int4 / int8 / full precision and why."""
    plan = Plan([BlockList.at(model, path) for path in find_block_lists(model, config)])
    in_blocks = {f"{prefix}{n}".rstrip(".") for bl in plan.block_lists for prefix, block in bl.blocks
                 for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    heads, token_embeddings = _heads_and_embeddings(model)
    float_by_layout = {f"{prefix}{n}": reason for bl in plan.block_lists for prefix, block in bl.blocks
                       for n, reason in KEPT_FLOAT.get((known_layout(block) or ("",))[0], {}).items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            reason = config.skipped_by(name)
            if name not in token_embeddings:
                plan.kept[name] = reason or "position / type embedding (only token embeddings become int8)"
            elif config.embeddings == "int8" and not reason:
                plan.int8[name] = module
            else:
                plan.kept[name] = reason or "token embedding (embeddings='keep')"
        if not isinstance(module, nn.Linear):
            continue
        reason = config.skipped_by(name)
        if name in heads:
            if config.lm_head == "int8" and not reason:
                plan.int8[name] = module
            else:
                plan.kept[name] = reason or "output head (lm_head='keep')"
        elif reason or name in float_by_layout:
            plan.kept[name] = reason or float_by_layout[name]
        elif name not in in_blocks:
            plan.kept[name] = "outside the transformer blocks"
        elif module.in_features % config.group_size:
            plan.kept[name] = f"in_features {module.in_features} is not a multiple of group_size {config.group_size}"
        else:
            plan.int4[name] = module
    _check_tied(model, plan)
    if not plan.int4 and not plan.int8:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UserError(f"{type(model).__name__} has no Linear layers to quantise")
        reasons = sorted(set(plan.kept.values()))
        raise UserError(f"nothing to quantise in {type(model).__name__}: all {len(linears)} Linear layers are "
                        f"left in full precision ({'; '.join(reasons[:3])})")
    return plan
