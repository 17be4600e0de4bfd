"""The family table (``templates/families.yaml``) and where template files live.

Owns: the schema of a family entry and loading it. Adding a family is adding a template
file and a table entry, not code.
Does not know: tokenizers, engines, HTTP.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

CHECKPOINT_TEMPLATE = "checkpoint"


class FamilySampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)


class FamilySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    template: str
    extra_templates: dict[str, str] = Field(default_factory=dict)
    stop: list[str] = Field(default_factory=list)
    bos: Literal["add", "template", "none"]
    system: str | None = None
    system_message: bool = True
    multi_turn: bool = True
    strip_content: bool = False
    sampling: FamilySampling = Field(default_factory=FamilySampling)
    quantile_tokens: list[str] = Field(default_factory=list)
    default_quantile: int = Field(default=0, ge=0)
    # How the online loop trains this family's models unless a models-file entry's
    # `online.method` says otherwise: the method its checkpoints were aligned with.
    training_method: Literal["cut", "kto", "dpo", "quark"] = "cut"

    @property
    def uses_checkpoint_template(self) -> bool:
        return self.template == CHECKPOINT_TEMPLATE


def templates_dir() -> Path:
    """``server/_templates`` in an installed wheel; the repo's ``templates/`` otherwise."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_templates", package.parent / "templates"):
        if (candidate / "families.yaml").is_file():
            return candidate
    raise FileNotFoundError("templates/families.yaml not found beside the server package")


@functools.cache
def families() -> dict[str, FamilySpec]:
    raw = yaml.safe_load((templates_dir() / "families.yaml").read_text())
    return {name: FamilySpec(name=name, **spec) for name, spec in raw.items()}


def family(name: str) -> FamilySpec:
    table = families()
    if name not in table:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def resolve_template_file(name: str, base: Path | None = None) -> Path:
    """A template named in the family table or a models file: a file in ``templates/``, or
    a path (relative to the models file's folder)."""
    path = Path(name)
    if not path.is_absolute():
        in_templates = templates_dir() / name
        if in_templates.is_file():
            return in_templates
        if base is not None:
            path = base / name
    if not path.is_file():
        raise FileNotFoundError(f"template file {name!r} not found")
    return path
