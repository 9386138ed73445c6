"""Every threshold of the error analysis, in one place (docs/report.md documents them).

The category and suggestion rules read these and nothing else, so a change here changes what
the report says, and a card or a suggestion always records the figures it compared with them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    # --- slices ---
    confidence: float = 0.95  # familywise level of the Wilson intervals (Bonferroni over the slices tried)
    min_support: int = 20  # smallest slice considered
    max_values: int = 10  # concepts with more distinct values are not sliced
    clusters: int = 8  # k-means clusters of the decision-level features
    max_slices: int = 20  # slices kept, best first

    # --- error categories (per error, first rule that fires, in this order) ---
    # perception: the attribution on the relevant truth regions of a modality is no higher
    # than their share of the units (enrichment <= this): the model did not look at them
    perception_enrichment: float = 1.0
    # interaction: the needed cross-modal pairs (relevant units x relevant units) carry no more
    # than their share of the |mixed interaction| (enrichment <= this)
    interaction_enrichment: float = 1.0
    # (or, with no fixed figure, the data needs interaction and the additive part alone gives the
    # wrong answer: reports/evidence.interaction_rule)
    # composition: no fixed figure; one concept's features against as many random features
    # (reports/evidence.composition_rule)

    # --- suggestions ---
    # shortcut: no fixed figure; the error-rate gap and the reliance are each compared with a
    # null at `confidence` (reports/findings.shortcuts, reports/reliance.py)
    # ignored modality: no fixed figure; the information a modality shows of the label that the
    # model leaves unused is compared with 0 at `confidence` (reports/findings.ignored_modalities)
    min_error_rate: float = 0.05  # below this error rate a model-wide suggestion is not worth making
    # an additive model cannot learn the rule even from decorrelated data: its shortcut fix
    # counts this much of its evidence
    additive_shortcut_discount: float = 0.5


DEFAULT = Thresholds()
