"""The models file: its schema (YAML, every key checked), loading it, and where each
entry's checkpoint and prompt format come from.

Owns: `models:` entries (checkpoint, family, engine and LoRA settings, GPU placement,
replicas on a cluster), the `resources:` section and the `judges:` section (which endpoint
judges, how, how often); the `cluster:` section's schema is ``cluster.config``'s.
Does not know: running engines (``registry``), HTTP.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from server.cluster.config import Autoscaling, ClusterSettings
from server.models.decoding import DecodingDefaults, GenerationConfigError, generation_config_values
from server.models.decoding import resolve as resolve_decoding
from server.models.default_model import DEFAULT_MODEL_NAME, builtin_model
from server.models.families import FamilySpec, templates_dir
from server.models.render import FamilyDetectionError, Renderer
from server.settings import Settings

# A models-file path that names the embedded default model instead of a folder.
BUILTIN_DEFAULT = f"builtin:{DEFAULT_MODEL_NAME}"


class ModelsFileError(ValueError):
    """The models file is missing, unreadable or invalid."""


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class LoraSettings(BaseModel):
    """vLLM's LoRA support for one model: what any adapter served on it may be."""

    model_config = ConfigDict(extra="forbid")

    max_rank: Literal[1, 8, 16, 32, 64, 128, 256] = 16
    max_loras: int = Field(default=2, ge=1, le=64)  # adapters in one batch
    max_cpu_loras: int = Field(default=8, ge=1, le=1024)  # adapters kept loaded


class OnlineSettings(BaseModel):
    """How the online loop trains this model (``POST /admin/align``, ``aligngate align``)."""

    model_config = ConfigDict(extra="forbid")

    # Default: the family's `training_method` (templates/families.yaml): the method its
    # checkpoints were aligned with (cut → cut, kto → kto, dpo → dpo, quark → quark,
    # chat → cut).
    method: Literal["cut", "kto", "dpo", "quark"] | None = None
    # The share of this model's stored traffic held out from training windows and exports
    # (by a hash of the completion id), for the promotion gate; default ALIGNGATE_HOLDOUT
    # (0.1).
    holdout: float | None = Field(default=None, ge=0, lt=1)


class AdapterEntry(BaseModel):
    """A LoRA adapter served from start-up: a folder under the adapters root."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    path: str  # relative to the adapters root


# vLLM engine arguments a models-file entry sets with a field of its own (``engine_args``
# refuses them), and that field.
ENGINE_ARGS_AS_ENTRY_FIELDS = {
    "model": "path",
    "served_model_name": "name",
    "max_model_len": "max_model_len",
    "dtype": "dtype",
    "seed": "seed",
    "trust_remote_code": "trust_remote_code",
    "enable_lora": "lora",
    "max_lora_rank": "lora.max_rank",
    "max_loras": "lora.max_loras",
    "max_cpu_loras": "lora.max_cpu_loras",
    "gpu_memory_utilization": "gpu_memory_utilization / gpu_memory_gib",
    "tensor_parallel_size": "devices (one per GPU)",
    "generation_config": "generation_config",
    "override_generation_config": "sampling",
}


class SamplingDefaults(BaseModel):
    """A model's defaults for the sampling fields a request leaves out (they win over the
    checkpoint's generation config and the family's defaults: ``models.decoding``)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)


class ModelEntry(BaseModel):
    """One served model, as written in the models file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    path: str
    # The prompt format (templates/families.yaml); detected from the checkpoint if omitted.
    family: Literal["cut", "kto", "dpo", "quark", "chat"] | None = None
    # A Jinja file replacing the family's template (a file in templates/ or a path).
    template: str | None = None
    # Quark: reward-quantile prefixes, best first (default: the 5 _QUANTILE_TOKEN_k_).
    quantile_tokens: list[str] | None = Field(default=None, min_length=1)
    default_quantile: int | None = Field(default=None, ge=0)
    max_model_len: int | None = Field(default=None, ge=16)
    # vLLM's dtype; auto: vLLM's choice on a GPU, float32 on a CPU (platform.engine_dtype).
    dtype: str = "auto"
    # vLLM's --generation-config: the sampling defaults of the checkpoint's
    # generation_config.json (auto), none (vllm), or a folder's (relative to this file).
    generation_config: str = "auto"
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    seed: int = 0
    trust_remote_code: bool = False
    # Record this model's completions in the store (a request's `store` field overrides).
    store: bool = False
    # Requests in flight on this model's engine before 429 (default: the setting).
    max_pending_requests: int | None = Field(default=None, ge=1, le=1_000_000)
    # LoRA adapters can be served on this model (at start-up: `adapters`; later: the admin
    # API). Listing adapters turns it on with the defaults.
    lora: LoraSettings | None = None
    adapters: list[AdapterEntry] = Field(default_factory=list)
    online: OnlineSettings = Field(default_factory=OnlineSettings)
    # Tool calls, as vLLM's --tool-call-parser / --enable-auto-tool-choice: the vLLM parser
    # that reads this model's calls out of its text, and whether `tool_choice: auto` (the
    # default with tools) is served. `required` and a named function need neither: their
    # answers are constrained to JSON. The chat template must take `tools`.
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    # GPUs (CUDA indices; more than one: tensor parallel) and this engine's memory on each,
    # as a fraction of the card (vLLM's gpu_memory_utilization) or in GiB. Unset: the
    # resource plan places the engine and gives it a share (`aligngate check` shows it).
    devices: list[int] | None = Field(default=None, min_length=1, max_length=64)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    gpu_memory_gib: float | None = Field(default=None, gt=0)
    # The KV cache this engine asks for when it shares a GPU (default: 8 full-length
    # sequences); the plan divides the memory in proportion to weights + this.
    kv_cache_tokens: int | None = Field(default=None, ge=16)
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # With a `cluster:` section: how many replicas of this model's engine run (a fixed
    # number, or `autoscaling`), and what each replica reserves in Ray's accounting.
    # Without one these are ignored: the model runs once, in this process.
    replicas: int | None = Field(default=None, ge=1, le=1024)
    autoscaling: Autoscaling | None = None
    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)
    # Requests a front end may queue for this model's replicas when every one holds its
    # `max_pending_requests` (Ray Serve's max_queued_requests); past it, a 429 in OpenAI's
    # error shape. Default: no such limit (the front end's admission still bounds them).
    max_queued_requests: int | None = Field(default=None, ge=1, le=1_000_000)

    @property
    def lora_settings(self) -> LoraSettings | None:
        return self.lora or (LoraSettings() if self.adapters else None)

    @field_validator("engine_args")
    @classmethod
    def _no_shadowing(cls, value: dict[str, Any]) -> dict[str, Any]:
        shadowed = set(ENGINE_ARGS_AS_ENTRY_FIELDS) & set(value)
        if shadowed:
            named = ENGINE_ARGS_AS_ENTRY_FIELDS
            fields = ", ".join(f"{a} as `{named[a]}`" for a in sorted(shadowed))
            raise ValueError(f"set {fields} (entry fields), not engine_args")
        return value

    @model_validator(mode="after")
    def _one_memory_share(self) -> ModelEntry:
        if self.gpu_memory_utilization is not None and self.gpu_memory_gib is not None:
            raise ValueError("give gpu_memory_utilization or gpu_memory_gib, not both")
        if self.devices is not None and len(set(self.devices)) != len(self.devices):
            raise ValueError("devices: each CUDA index once")
        if self.devices is not None and min(self.devices) < 0:
            raise ValueError("devices: CUDA indices are 0 or more")
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("give replicas or autoscaling, not both")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser (as vLLM's flags)")
        if self.tool_call_parser is not None:
            from server.engine.tool_parsing import check_parser_name

            check_parser_name(self.tool_call_parser)
        return self


class TrainingResources(BaseModel):
    """Where the online loop's trainer runs and what it keeps for itself there."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")
    # GiB kept free on the training GPU (default: the planner's estimate for the largest
    # model served with LoRA at CUT's defaults).
    reserve_gib: float | None = Field(default=None, ge=0)
    gradient_checkpointing: bool = False


class Resources(BaseModel):
    """The models file's `resources:` section (every field optional)."""

    model_config = ConfigDict(extra="forbid")

    # The share of each GPU's memory the engines and the training reserve may use.
    gpu_memory_fraction: float = Field(default=0.90, gt=0, le=1)
    training: TrainingResources = Field(default_factory=TrainingResources)


JUDGE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# `url: self`: this gateway's own OpenAI-compatible address (see ``JudgeEntry.url``).
SELF_URL = "self"


class JudgeEntry(BaseModel):
    """One AI judge: an OpenAI-compatible chat endpoint asked with a versioned prompt file.

    The kinds: ``judgment`` (CUT's natural-language judgment of one response: what is wrong,
    or that nothing is), ``score`` (a 1-10 rating, desirable at or above ``threshold``, as
    HALOs' labeller), ``pairwise`` (A vs B, asked in both orders; a verdict that flips with
    the order is a tie), and ``function``: a verifiable reward, code that gives one of those
    three verdicts (``verdict``) instead of a model (``target: "module:callable"``, as TRL's
    ``reward_funcs``).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=JUDGE_NAME_PATTERN)
    kind: Literal["judgment", "score", "pairwise", "function"]
    # A base URL such as http://127.0.0.1:8000/v1 (requests go to {url}/chat/completions),
    # or `self`: this gateway (the served address; `aligngate judge`: ALIGNGATE_HOST/PORT).
    # Not for `function` judges.
    url: str | None = Field(default=None, pattern=r"^(self|https?://\S+)$")
    model: str | None = Field(default=None, min_length=1, max_length=256)
    # `function` judges: the callable (importable `module:attribute`) and which verdict it
    # gives — score: f(conversation, response) -> 1..10; judgment: f(conversation,
    # response) -> str (what is wrong) | None (fine); pairwise: f(conversation, a, b) ->
    # "a" | "b" | "tie".
    target: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    verdict: Literal["judgment", "score", "pairwise"] | None = None
    # The name of an environment variable holding the endpoint's key (never the key itself,
    # so a models file can be committed). Unset: no Authorization header.
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # A prompt file: a name under templates/judges/ or a path (relative to the models file).
    # Default: the kind's `<kind>-v1.jinja`.
    prompt: str | None = None
    # score: a rating at or above this is desirable. 7: the CUT repo's rule for its optional
    # `score` field (≥ 7 counts as a fine response).
    threshold: float = Field(default=7.0, ge=1, le=10)
    # Live traffic: the fraction of stored completions judged in the background (0: none),
    # of these served models only (default: every model).
    sample: float = Field(default=0.0, ge=0, le=1)
    models: list[str] | None = Field(default=None, min_length=1)
    requests_per_minute: int = Field(default=60, ge=1, le=100_000)
    # Completions waiting for this judge; past it a sampled completion is dropped (counted).
    queue_size: int = Field(default=256, ge=1, le=100_000)
    max_tokens: int = Field(default=512, ge=1, le=32_768)
    # Constrain the reply to the kind's format (reasoning, then the marker) with vLLM's
    # `structured_outputs` extension: for judges served by vLLM or aligngate, so a small judge
    # model always writes a marker. Other endpoints refuse the field: leave it off there.
    constrain: bool = False
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    # Attempts per request (429, 5xx, connection errors and timeouts are retried with
    # exponential backoff).
    max_attempts: int = Field(default=4, ge=1, le=10)
    # The key id its verdicts are stored under: trust for training is given to key ids
    # (ALIGNGATE_TRUSTED_ANNOTATORS), so a judge is trusted exactly when this id is named.
    key_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]{1,64}$")

    @model_validator(mode="after")
    def _endpoint_or_function(self) -> JudgeEntry:
        if self.kind == "function":
            if self.target is None:
                raise ValueError(f"judge {self.name!r}: a function judge needs `target`")
            if self.url is not None or self.model is not None or self.constrain:
                raise ValueError(f"judge {self.name!r}: a function judge has no url or model")
        else:
            if self.url is None or self.model is None:
                raise ValueError(f"judge {self.name!r}: give `url` and `model`")
            if self.target is not None or self.verdict is not None:
                raise ValueError(
                    f"judge {self.name!r}: `target` and `verdict` are for kind: function"
                )
        return self

    @property
    def role(self) -> Literal["judgment", "score", "pairwise"]:
        """The verdict this judge gives (a function judge's ``verdict``, default score)."""
        if self.kind == "function":
            return self.verdict or "score"
        return self.kind

    @property
    def stored_key_id(self) -> str:
        return self.key_id or f"judge-{self.name}"

    @property
    def annotator(self) -> str:
        return f"judge:{self.name}"

    @property
    def prompt_file(self) -> str:
        return self.prompt or f"{self.role}-v1.jinja"


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(min_length=1)
    resources: Resources = Field(default_factory=Resources)
    judges: list[JudgeEntry] = Field(default_factory=list)
    cluster: ClusterSettings | None = None

    @field_validator("judges")
    @classmethod
    def _unique_judges(cls, value: list[JudgeEntry]) -> list[JudgeEntry]:
        names = [j.name for j in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate judge name(s): {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _judged_models_exist(self) -> ModelsFile:
        served = {m.name for m in self.models} | {a.name for m in self.models for a in m.adapters}
        for judge in self.judges:
            unknown = sorted(set(judge.models or []) - served)
            if unknown:
                raise ValueError(
                    f"judge {judge.name!r}: models {', '.join(unknown)} are not in `models:`"
                )
        return self

    @model_validator(mode="after")
    def _cluster_places_replicas(self) -> ModelsFile:
        if self.cluster is None:
            return self
        placed = [m.name for m in self.models if m.devices is not None]
        if placed:
            raise ValueError(
                f"model(s) {', '.join(placed)}: `devices` places an engine on this machine; "
                "on a cluster Ray places each replica (use num_gpus)"
            )
        return self

    @field_validator("models")
    @classmethod
    def _unique_names(cls, value: list[ModelEntry]) -> list[ModelEntry]:
        names = [m.name for m in value] + [a.name for m in value for a in m.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model name(s): {', '.join(dupes)}")
        return value


@dataclass(frozen=True)
class Deployment:
    """A models file: the models and the resources they share."""

    models: list[ModelEntry]
    resources: Resources = field(default_factory=Resources)
    judges: list[JudgeEntry] = field(default_factory=list)
    # None: every engine in this process (the default); else a Ray Serve deployment each.
    cluster: ClusterSettings | None = None


def load_models_file(path: Path) -> list[ModelEntry]:
    return load_deployment(path).models


def load_deployment(path: Path) -> Deployment:
    """Parse a models file; relative paths (checkpoints, templates) resolve against its folder."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelsFileError(f"cannot read models file {path}: {exc}") from exc
    try:
        parsed = ModelsFile.model_validate(raw)
    except ValidationError as exc:
        raise ModelsFileError(f"invalid models file {path}:\n{exc}") from exc
    base = path.resolve().parent
    entries = []
    for entry in parsed.models:
        update: dict[str, str] = {}
        if not entry.path.startswith("builtin:") and not Path(entry.path).is_absolute():
            update["path"] = str(base / entry.path)
        if entry.template and (base / entry.template).is_file():
            update["template"] = str(base / entry.template)
        setting = entry.generation_config
        if setting not in ("auto", "vllm") and not Path(setting).is_absolute():
            update["generation_config"] = str(base / setting)
        entries.append(entry.model_copy(update=update) if update else entry)
    if any(j.kind == "function" for j in parsed.judges) and str(base) not in sys.path:
        # A function judge's module may sit beside the models file (`target: rules:fn`).
        sys.path.append(str(base))
    judges = []
    for judge in parsed.judges:
        if judge.prompt and (base / judge.prompt).is_file():
            judge = judge.model_copy(update={"prompt": str(base / judge.prompt)})
        elif not (templates_dir() / "judges" / judge.prompt_file).is_file():
            raise ModelsFileError(
                f"judge {judge.name!r}: prompt file {judge.prompt_file!r} is neither in "
                f"templates/judges/ nor beside {path}"
            )
        judges.append(judge)
    return Deployment(
        models=entries, resources=parsed.resources, judges=judges, cluster=parsed.cluster
    )


def default_entries() -> list[ModelEntry]:
    return [
        ModelEntry(
            name=DEFAULT_MODEL_NAME,
            path=BUILTIN_DEFAULT,
            max_model_len=8192,
            store=True,
            lora=LoraSettings(),  # so `aligngate align` can hot-load what it trains
        )
    ]


def default_deployment() -> Deployment:
    return Deployment(models=default_entries())


def resolve_path(entry: ModelEntry, settings: Settings) -> str:
    if entry.path.startswith("builtin:"):
        try:
            return str(builtin_model(entry.path.removeprefix("builtin:"), settings.models_dir))
        except KeyError as exc:
            raise ModelsFileError(f"model {entry.name!r}: {exc.args[0]}") from exc
    if not Path(entry.path).is_dir():
        raise ModelsFileError(f"model {entry.name!r}: {entry.path} is not a folder")
    return entry.path


def decoding_defaults(entry: ModelEntry, path: str, family: FamilySpec) -> DecodingDefaults:
    """The model's defaults for left-out sampling fields, each with its source."""
    try:
        values, source = generation_config_values(entry.generation_config, Path(path))
    except GenerationConfigError as exc:
        raise ModelsFileError(f"model {entry.name!r}: {exc}") from exc
    return resolve_decoding(
        entry.sampling.model_dump(exclude_none=True),
        values,
        source,
        family.sampling.model_dump(exclude_none=True),
    )


def build_renderer(entry: ModelEntry, path: str) -> Renderer:
    try:
        return Renderer.load(
            path,
            family_name=entry.family,
            template=entry.template,
            trust_remote_code=entry.trust_remote_code,
            quantile_tokens=entry.quantile_tokens,
            default_quantile=entry.default_quantile,
        )
    except (FamilyDetectionError, FileNotFoundError) as exc:
        raise ModelsFileError(f"model {entry.name!r}: {exc}") from exc
