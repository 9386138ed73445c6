"""summary.json, typed: the run's blocks here, each stage's from its record (`Stage.summary`,
stages/summaries.py). `check` holds a summary to them before the run is written; `page` writes
the documentation's summary.json reference from them (docs/summary-json.md)."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError, with_config
from typing_extensions import Doc, NotRequired, TypedDict

from mmdiag.stages import registry
from mmdiag.stages.summaries import Skipped, Strict


@with_config(Strict)
class RunBlock(TypedDict):
    name: Annotated[str, Doc("the run folder's name")]
    created: Annotated[str, Doc("when, in UTC (ISO 8601)")]
    device: Annotated[str, Doc("`cpu` or `cuda`")]
    mixed_models: NotRequired[Annotated[str, Doc("present only after `rerun --model`: which stage belongs to which model")]]


@with_config(Strict)
class ModelBlock(TypedDict):
    name: Annotated[str, Doc("the built-in name or factory")]
    fingerprint: Annotated[str, Doc("sha256 (16 hex) of the weights")]
    split: Annotated[str, Doc("the split the stages analyse (`ood` for the demo)")]
    n: Annotated[int, Doc("samples of that split")]
    accuracy: Annotated[float, Doc("accuracy on it")]
    n_errors: Annotated[int, Doc("errors on it")]
    splits: Annotated[dict[str, dict[str, Any]], Doc("`n` and `accuracy` of every evaluated split (demo: `iid`, `ood`, `anti`)")]
    fusion: Annotated[
        str | None,
        Doc(
            "where the adapter says the modalities meet: `late` (separate/fuse, proven by the pre-flight), `joint` (declared: attention over both, FiLM), "
            "null (not declared); it decides which of an additive model's findings is the cause"
        ),
    ]
    slices: Annotated[list[dict[str, Any]], Doc("`[{where, n, accuracy}]`: accuracy where each concept takes each value, e.g. `shortcut_agrees=0`")]


@with_config(Strict)
class StageStatus(TypedDict):
    seconds: Annotated[float | None, Doc("of the computation, also when it came from cache")]
    cached: Annotated[bool, Doc("whether it came from the cache")]
    key: Annotated[str, Doc("content hash of its result: equal keys, equal figures (timings travel beside the content, so two runs of the same computation on different machines get equal keys)")]
    model: Annotated[str, Doc("the fingerprint of the model it was computed for")]


@with_config(Strict)
class ErrorsBlock(TypedDict):
    n: Annotated[int, Doc("errors on the analysed split")]
    error_rate: Annotated[float, Doc("their share")]
    slices: Annotated[
        list[dict[str, Any]], Doc("`[{id, where, kind, conditions, n, n_errors, error_rate, ci: [low, high], lift, profile?}]`, best first; `profile` says what a feature cluster is mostly made of")
    ]
    categories: Annotated[
        dict[str, int],
        Doc(
            "errors per cause (a registered per-error rule that rests on interventions: `shortcut`, `ignored_modality`, `label`, `perception`, `interaction`), "
            "and `undetermined`; the cards, with the deciding figures and a sentence, are in `errors.json`"
        ),
    ]
    association_only: Annotated[int, Doc("undetermined cards that name a rule fired on an association alone (`rule.association_only`)")]
    disagreement: Annotated[list[dict[str, Any]], Doc('`[{where: "c≠label", concept, n, accuracy}]` per binary concept: what `mmdiag compare` shows before and after a fix')]
    notes: Annotated[list[str], Doc("one line per rule that lacked a link it needed (`truth_concepts`, `class_concepts`, a counterfactual)")]


@with_config(Strict)
class Suggestion(TypedDict):
    id: Annotated[str, Doc("`rule:subject`")]
    rule: Annotated[str, Doc("the finding rule (reports.suggest.FINDINGS)")]
    subject: Annotated[str, Doc("the concept, region, modality or feature it is about")]
    title: Annotated[str, Doc("what to do, in a line")]
    finding: Annotated[str, Doc("what was found, in words")]
    evidence: Annotated[list[dict[str, Any]], Doc("`[{label, value, section}]`: the figures behind it and the report section that shows them")]
    change: Annotated[str, Doc("the concrete change")]
    action: Annotated[dict[str, Any], Doc("the change, machine-readable (`kind` and its arguments)")]
    figures: Annotated[dict[str, Any], Doc("every figure the rule used")]
    priority: Annotated[float, Doc("the share of samples at stake, discounted where it is a symptom of another finding")]
    rank: Annotated[int, Doc("1 = highest priority")]
    feature: NotRequired[Annotated[dict[str, Any], Doc("where the subject is a feature mmdiag found: `{id, modality, kind, word | box | ..., found: true}`")]]


BLOCKS: dict[str, tuple[Any, str]] = {
    "run": (RunBlock, "the run"),
    "model": (ModelBlock, "the model's evaluation"),
    "errors": (ErrorsBlock, "the error analysis"),
    "suggestions": (list[Suggestion], "the debugging suggestions, highest priority first"),
    "stages": (dict[str, StageStatus], "per stage (`model` is the evaluation step)"),
}


def check(summary: dict) -> None:
    """Hold a summary to its types: the run's blocks and each registered stage's (a stage may
    write `{"skipped": reason}` alone). A mismatch is a bug in mmdiag or a plugin."""
    typed = {name: t for name, (t, _) in BLOCKS.items()}
    typed |= {s.name: s.summary for s in registry.stages() if s.summary is not None}
    for name, t in typed.items():
        if name in summary:
            if name not in BLOCKS and set(summary[name]) == {"skipped"}:
                t = Skipped
            try:
                TypeAdapter(t).validate_python(summary[name], strict=False)
            except ValidationError as e:
                err = e.errors()[0]
                raise AssertionError(f"summary.json[{name!r}] does not match its type at {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def _doc(hint) -> str:
    return next((m.documentation for m in getattr(hint, "__metadata__", ()) if isinstance(m, Doc)), "")


def _inner(hint):
    """The type under NotRequired / Annotated / None."""
    while True:
        origin = typing.get_origin(hint)
        if origin in (NotRequired, typing.NotRequired):
            hint = typing.get_args(hint)[0]
        elif origin is Annotated:
            hint = hint.__origin__
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) != 1:
                return hint
            hint = args[0]
        else:
            return hint


def _rows(prefix: str, td) -> list[tuple[str, str]]:
    """(key, meaning) of a TypedDict's keys, a record's keys below its own (`<name>` for a
    mapping's keys, `[]` for a list's items)."""
    out = []
    for key, hint in typing.get_type_hints(td, include_extras=True).items():
        optional = typing.get_origin(hint) in (NotRequired, typing.NotRequired)
        if optional:
            hint = typing.get_args(hint)[0]
        path = f"{prefix}.{key}"
        out.append((f"`{path}`" + (" (optional)" if optional else ""), _doc(hint)))
        inner = _inner(hint)
        if typing.get_origin(inner) is dict and typing.is_typeddict(typing.get_args(inner)[1]):
            out += _rows(f"{path}.<name>", typing.get_args(inner)[1])
        elif typing.is_typeddict(inner):
            out += _rows(path, inner)
    return out


def page() -> str:
    """docs/summary-json.md: every key of summary.json and its meaning, from the types."""
    lines = [
        "# summary.json reference",
        "",
        "<!-- generated by `python -m mmdiag.flows.summary` from flows/summary.py and stages/summaries.py; tests/test_summary_types.py keeps it current -->",
        "",
        "Every run writes `summary.json` (`schema`: `mmdiag.summary/1`): the blocks below, one per stage that ran. The flow checks each block against",
        'its type before it writes the run. A stage that had nothing to work on writes `{"skipped": reason}` alone.',
        "",
    ]
    sections = [(name, t, what) for name, (t, what) in BLOCKS.items() if name != "stages"]
    sections += [(s.name, s.summary, f"stage `{s.name}`") for s in registry.stages() if s.summary is not None]
    sections.append(("stages", BLOCKS["stages"][0], BLOCKS["stages"][1]))
    for name, t, what in sections:
        lines += [f"## {name}", "", what[0].upper() + what[1:] + ".", "", "| key | meaning |", "|---|---|"]
        if typing.get_origin(t) is list:
            rows = _rows(f"{name}[]", typing.get_args(t)[0])
        elif typing.get_origin(t) is dict:
            rows = _rows(f"{name}.<name>", typing.get_args(t)[1])
        else:
            rows = _rows(name, t)
        lines += [f"| {key} | {meaning.replace('|', chr(92) + '|')} |" for key, meaning in rows]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import mmdiag.stages  # noqa: F401  (the built-in stages register themselves)

    print(page(), end="")
