"""The four training methods side by side: what each trains on, where that feedback comes
from, its config and its trainer. The online loop and the CLI look methods up here; adding a
method is an entry here, a config class and a trainer.

- cut: judgments (what is wrong, in words) and responses judged fine; export ``cut``;
  CUT's own loss in transformers' ``Trainer``.
- kto: binary labels (thumbs, desirable/undesirable, score judges against their
  threshold); export ``trl-kto``; TRL's ``KTOTrainer``.
- dpo: pairs (arena votes, pairwise judges, ``preferred_over`` from a UI, two differently
  rated choices of one request); export ``dpo``; TRL's ``DPOTrainer``.
- quark: scalar rewards (score judges' 1-10, ratings, explicit ``reward`` values); export
  ``quark`` (ALT's data pool); Quark's NLL + KL loss in ``Trainer``.

Owns: the table, counting a window's usable feedback, the refusal message.
Does not know: HTTP, SQL, how each trainer works inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from server.training.arguments import TrainingArgs

MethodName = Literal["cut", "kto", "dpo", "quark"]


@dataclass(frozen=True)
class Method:
    name: MethodName
    export_format: str  # ``feedback.export`` format the trainer reads
    unit: str  # what one usable piece of feedback is, plural
    # The fewest units an online iteration trains on unless the request says otherwise:
    # CUT learns from a single judgment (the loop's historic minimum); the others need one
    # optimizer step's worth at the default batch size (8), and KTO's KL estimate a
    # micro-batch of several examples.
    min_units: int
    how_to_collect: str

    def config_class(self) -> type[TrainingArgs]:
        if self.name == "cut":
            from server.training.trainer import CutConfig

            return CutConfig
        if self.name == "quark":
            from server.training.quark import QuarkConfig

            return QuarkConfig
        from server.training.preference import DpoConfig, KtoConfig

        return KtoConfig if self.name == "kto" else DpoConfig

    def count(self, items: list[dict[str, Any]]) -> int:
        """The usable units in an export of this method's format."""
        if self.name == "cut":
            return sum(1 for item in items if item.get("judgment") is not None)
        if self.name == "quark":
            return sum(len(item["generations"]) for item in items)
        return len(items)

    def shortfall(self, found: int, needed: int, model: str, trusted_only: bool) -> str:
        which = " reviewed or by trusted keys" if trusted_only else ""
        return (
            f"{self.name} needs ≥ {needed} {self.unit}; {found} {self.unit}{which} of "
            f"`{model}` in the window since the last iteration: {self.how_to_collect}"
        )


METHODS: dict[str, Method] = {
    "cut": Method(
        name="cut",
        export_format="cut",
        unit="judged responses",
        min_units=1,
        how_to_collect="post judgments (POST /v1/feedback with `judgment`) or enable a "
        "judgment judge (judges: kind: judgment, sample > 0)",
    ),
    "kto": Method(
        name="kto",
        export_format="trl-kto",
        unit="labelled responses (desirable or undesirable)",
        min_units=8,
        how_to_collect="collect thumbs or labels (POST /v1/feedback with `rating` or "
        "`label`) or enable a score judge (judges: kind: score, sample > 0)",
    ),
    "dpo": Method(
        name="dpo",
        export_format="dpo",
        unit="pairs",
        min_units=8,
        how_to_collect="enable a pairwise judge (judges: kind: pairwise, sample > 0; "
        "requests with n ≥ 2) or the arena, or post `preferred_over` feedback",
    ),
    "quark": Method(
        name="quark",
        export_format="quark",
        unit="scored generations",
        min_units=8,
        how_to_collect="enable a score judge (judges: kind: score, sample > 0) or post "
        "ratings or `reward` values (POST /v1/feedback)",
    ),
}


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown training method {name!r}; known: {', '.join(METHODS)}") from None
