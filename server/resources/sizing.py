"""Sizes read from a checkpoint without loading it: parameters and bytes of the weights
(the safetensors headers, else the config), KV-cache bytes per token, LoRA slot bytes, and
the memory a CUT training run needs.

All figures are estimates of the kind vLLM's and PEFT's users make by hand; the planner
states them as such.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.resources.platform import GIB

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "half": 2, "float": 4}
# safetensors dtype codes → bytes per element
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


class SizingError(ValueError):
    """A checkpoint whose size cannot be read (no config, an unknown architecture)."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The numbers of a decoder-only transformer that its memory follows from."""

    architecture: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_position: int
    tied_embeddings: bool
    config_dtype: str  # the checkpoint's stored precision

    @property
    def is_gptj(self) -> bool:
        return self.architecture.startswith("GPTJ")

    def parameters(self) -> int:
        h, i, v, n = self.hidden, self.intermediate, self.vocab, self.layers
        kv = self.kv_heads * self.head_dim
        if self.is_gptj:
            # q, k, v, out (no bias); fc_in/fc_out with bias; ln_1; final ln; lm_head + bias
            per_layer = 4 * h * h + (h * i + i) + (i * h + h) + 2 * h
            return v * h + n * per_layer + 2 * h + (v * h + v)
        # LLaMA / Mistral: q, o (h×h); k, v (h×kv); gate, up, down; two RMSNorms
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        head = 0 if self.tied_embeddings else v * h
        return v * h + n * per_layer + h + head

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def lora_slot_bytes(self, rank: int, dtype_bytes: int) -> int:
        """One adapter slot as vLLM preallocates it: A (in × r) and B (r × out) for every
        slice of every linear layer it can adapt (q, k, v, o; gate, up, down), whatever the
        adapters target (``create_lora_weights`` in vLLM's LoRA layers)."""
        h, i = self.hidden, self.intermediate
        kv = self.kv_heads * self.head_dim
        if self.is_gptj:
            dims = [(h, h)] * 4 + [(h, i), (i, h)]
        else:
            dims = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
        return self.layers * sum(a + b for a, b in dims) * rank * dtype_bytes

    def lora_parameters(self, rank: int, modules: tuple[str, ...]) -> int:
        """Trainable parameters of a PEFT LoRA on ``modules`` (CUT: gate, up, down)."""
        h, i = self.hidden, self.intermediate
        kv = self.kv_heads * self.head_dim
        dims = {
            "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "out_proj": (h, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
            "fc_in": (h, i), "fc_out": (i, h),
        }  # fmt: skip
        return self.layers * rank * sum(sum(dims[m]) for m in modules if m in dims)


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """LLaMA-, Mistral-, Qwen2-style and GPT-J configs (``config.json``)."""
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    try:
        if config.get("model_type") == "gptj":
            hidden, heads = config["n_embd"], config["n_head"]
            return ModelShape(
                architecture=arch if arch.startswith("GPTJ") else "GPTJForCausalLM",
                hidden=hidden,
                layers=config["n_layer"],
                heads=heads,
                kv_heads=heads,
                head_dim=hidden // heads,
                intermediate=config.get("n_inner") or 4 * hidden,
                vocab=config["vocab_size"],
                max_position=config.get("n_positions", 2048),
                tied_embeddings=False,
                config_dtype=dtype,
            )
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        return ModelShape(
            architecture=arch,
            hidden=hidden,
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
            max_position=config.get("max_position_embeddings", 2048),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            config_dtype=dtype,
        )
    except KeyError as exc:
        raise SizingError(f"config of {arch} lacks {exc.args[0]!r}") from None


def read_shape(folder: Path) -> ModelShape:
    path = folder / "config.json"
    try:
        return shape_from_config(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise SizingError(f"cannot read {path}: {exc}") from exc


def safetensors_bytes(folder: Path) -> int | None:
    """Bytes of every tensor in the folder's ``*.safetensors`` files, from their headers
    alone (8-byte length, then JSON); None where there are none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            start, end = tensor["data_offsets"]
            total += end - start
    return total


def dtype_bytes(requested: str, shape: ModelShape) -> int:
    """Bytes per weight as vLLM serves it: ``auto`` keeps a 16-bit checkpoint's precision and
    serves a float32 one in 16 bits too (as vLLM does)."""
    if requested == "auto":
        return 2
    if requested not in DTYPE_BYTES:
        raise SizingError(f"unknown dtype {requested!r}")
    return DTYPE_BYTES[requested]


def weights_bytes(folder: Path | None, shape: ModelShape, served_bytes: int) -> int:
    """The served weights: the safetensors headers scaled to the served precision, else the
    parameter count from the config."""
    on_disk = safetensors_bytes(folder) if folder is not None else None
    if on_disk is None:
        return shape.parameters() * served_bytes
    stored = DTYPE_BYTES.get(shape.config_dtype, 2)
    return on_disk * served_bytes // stored


@dataclass(frozen=True, slots=True)
class TrainingMemory:
    """A CUT LoRA run at micro-batch 1: what the trainer's device must hold (bytes)."""

    weights: int
    lora_state: int  # LoRA weights, gradients and AdamW's two moments, float32
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.lora_state + self.activations + self.logits + self.overhead

    def describe(self) -> str:
        parts = [("weights", self.weights), ("LoRA + optimizer", self.lora_state),
                 ("activations", self.activations), ("logits", self.logits),
                 ("overhead", self.overhead)]  # fmt: skip
        return " + ".join(f"{name} {value / GIB:.1f}" for name, value in parts) + " GiB"


TRAINING_OVERHEAD = GIB  # CUDA context, allocator slack


def training_memory(
    shape: ModelShape,
    *,
    dtype_bytes: int,
    lora_rank: int = 16,
    target_modules: tuple[str, ...] = ("gate_proj", "down_proj", "up_proj"),
    cutoff: int = 2048,
    gradient_checkpointing: bool = False,
) -> TrainingMemory:
    """CUT runs a judged example's two sequences (with and without the judgment) through one
    forward pass, so 2 × ``cutoff`` tokens are live. Activations follow Korthikanti et al.
    (2022) with fused attention: ~34·h bytes per token and layer in 16 bits; with gradient
    checkpointing only each layer's input (2·h) is kept, plus one layer recomputed."""
    tokens = 2 * cutoff
    scale = dtype_bytes / 2
    full_layer = int(34 * shape.hidden * tokens * scale)
    if gradient_checkpointing:
        activations = shape.layers * 2 * shape.hidden * tokens * dtype_bytes + full_layer
    else:
        activations = shape.layers * full_layer
    return TrainingMemory(
        weights=shape.parameters() * dtype_bytes,
        lora_state=shape.lora_parameters(lora_rank, target_modules) * 16,
        activations=activations,
        logits=tokens * shape.vocab * 4 * 2,  # float32 logits and their log-softmax
        overhead=TRAINING_OVERHEAD,
    )
