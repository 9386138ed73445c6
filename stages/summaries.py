"""What each stage writes into summary.json, typed: the contract the reports read and the
documentation's summary.json page is generated from (docs/summary-json.md, `make docs`).

Every key carries its meaning (`Doc`); the flow checks each stage's summary against its type
before it writes the run (an unknown or missing key is a bug, not a user's error). Deeper
records stay `dict` where the page describes them in words.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, with_config
from typing_extensions import Doc, NotRequired, TypedDict

Strict = ConfigDict(extra="forbid")


@with_config(Strict)
class Skipped(TypedDict):
    """A stage that had nothing to work on writes this alone."""

    skipped: Annotated[str, Doc("why the stage computed nothing")]


@with_config(Strict)
class DiscoverySummary(TypedDict):
    n: Annotated[int, Doc("samples tested")]
    fdr: Annotated[float, Doc("the false discovery rate (Benjamini-Hochberg)")]
    candidates: Annotated[int, Doc("candidate features: words, image places, image-wide transforms")]
    reliable: Annotated[
        list[dict[str, Any]],
        Doc(
            "`[{id, modality, kind, word | box | group and side | colour (a segment group) | transform, found: true, n, push, flip_rate, null_flip_rate, "
            "flip_effect, accuracy_change, p_value, q_value, error_rate_agree, error_rate_disagree, fixes_error_rate, errors_explained, annotated_as?, within?}]`: "
            "every feature whose removal flips more predictions than its null; `push` is the class it pushes towards, `box` is `[x0, y0, x1, y1]` in the "
            "input's pixels (x right, y down, end exclusive); `annotated_as` names the annotated concept at the same place, `within` the stronger feature it overlaps"
        ),
    ]
    priors: Annotated[
        list[dict[str, Any]],
        Doc(
            "`[{word, text, modality, n, flip_rate, flip_rate_elsewhere, error_rate, error_rate_elsewhere, errors_unmoved, errors_explained, p_value, q_value, prior}]`: "
            "the slices named by a word of modality `text` on which the answers depend on `modality` less than elsewhere (`flip_rate`: share of other "
            "samples' inputs of `modality` that change a prediction) and the model errs more, at the FDR (stages/priors.py); most errors explained first"
        ),
    ]
    slices_tested: Annotated[int, Doc("word slices tested for a prior (words x the modalities swapped)")]
    forward_passes_per_sample: Annotated[float, Doc("model inputs per sample")]
    taken: Annotated[list[str], Doc("the ids that became concepts for every later stage and rule (found, not annotated, not within another)")]


@with_config(Strict)
class RegionLocalisation(TypedDict):
    n: Annotated[int, Doc("samples where the region exists")]
    mass: Annotated[float, Doc("share of |attribution| on the region")]
    enrichment: Annotated[float, Doc("mass / the region's share of the units")]
    top1_rate: Annotated[float, Doc("how often the top unit lies mostly inside the region")]


@with_config(Strict)
class MethodQuality(TypedDict):
    deletion_auc: Annotated[float | None, Doc("area under the target probability as units are removed, most attributed first (lower is better)")]
    insertion_auc: Annotated[float | None, Doc("the same as units are added (higher is better)")]
    completeness_error: Annotated[float | None, Doc("mean |sum(attribution) - (f(x) - f(baseline))| / mean |f(x) - f(baseline)|; null where the method has no such identity")]
    sanity_rank_corr: Annotated[float | None, Doc("rank correlation with the maps of a randomised model (near 1: the map ignores what the model learnt)")]
    forward_passes: Annotated[float, Doc("model inputs per map")]
    truth: Annotated[dict[str, RegionLocalisation], Doc("per truth region (`modality.region` where a name repeats)")]
    seconds: NotRequired[Annotated[float, Doc("time spent (a timing: not part of the result's key)")]]


@with_config(Strict)
class UnimodalSummary(TypedDict):
    n_explained: Annotated[int, Doc("samples stage 1 explained")]
    n_errors_explained: Annotated[int, Doc("errors among them")]
    skipped: Annotated[list[dict[str, Any]], Doc("`[{id, reason}]`: samples skipped (non-finite attribution or model output)")]
    modality_share: NotRequired[Annotated[dict[str, dict[str, Any]], Doc("MM-SHAP share per modality: `mean`, `std` over samples (with `shapley` among the methods)")]]
    modality_ablation: Annotated[
        dict[str, dict[str, Any]],
        Doc(
            "exact modality Shapley value per modality: `shapley`, `abs_shapley` (means), `share` (of the |modality Shapley values|: the modality's share of the "
            "logit change); `interaction`: `mean`, `abs_mean` of the modality interaction; `pairs.<a×b>`: exact Shapley interaction index of each modality pair"
        ),
    ]
    methods: Annotated[dict[str, MethodQuality], Doc("per attribution method (stages.unimodal.methods)")]


@with_config(Strict)
class CrossmodalSummary(TypedDict):
    n_reference: Annotated[int, Doc("EMAP's reference set size")]
    full_accuracy: Annotated[float, Doc("accuracy of the model on the reference set")]
    additive_accuracy: Annotated[float, Doc("accuracy of its additive projection (EMAP) there")]
    interaction_share: Annotated[float, Doc("share of the logits' variation the additive projection misses (0 = additive model)")]
    modality_interaction: Annotated[float, Doc("mean absolute exact modality-level interaction (stage 1's, over the explained samples)")]
    additive_follows: Annotated[dict[str, float], Doc("how often the additive prediction equals each class-valued concept")]
    full_follows: Annotated[dict[str, float], Doc("how often the full prediction does")]
    dime: Annotated[dict[str, float], Doc("`unimodal_abs_mean`, `interaction_abs_mean` of the predicted logit's DIME split")]
    n_explained: Annotated[int, Doc("samples with interaction graphs")]
    top_pairs: Annotated[list[dict[str, Any]], Doc("`[{units: [label, label], modalities, count, mean_weight}]`: the unit pairs most often among a sample's strongest")]
    methods: Annotated[
        dict[str, dict[str, Any]],
        Doc(
            "`emap`, `mixed_gradients`, `shapley_interaction`: `forward_passes` (model inputs) and `seconds`; `emap.late_fusion`: whether EMAP took the adapter's "
            "late-fusion path (`forward_passes` then counts encoder passes, `fusion_evaluations` the fusion's); `mixed_gradients.path`: the differentiation used, "
            "with `why` the faster path did not run"
        ),
    ]
    shapley_interaction: NotRequired[Annotated[dict[str, Any], Doc("`pairs_per_sample`, `abs_mean`, `sign_agreement` (with the mixed-gradient sign)")]]


@with_config(Strict)
class RepresentationSummary(TypedDict):
    n: Annotated[int, Doc("samples probed")]
    layers: Annotated[dict[str, dict[str, Any]], Doc("probed `shape` and `width` per layer")]
    probes: Annotated[
        dict[str, dict[str, dict[str, Any]]],
        Doc("`<concept>.<layer>`: `accuracy` and `control` (shuffled labels) on the `n_test` held-out samples, `selectivity` (= accuracy - control), `n` (known), `unknown`"),
    ]
    features: Annotated[list[dict[str, Any]], Doc("one `{feature, concept (null: unassigned), auroc (raw), modality_dependence: {modality: share}}` per decision feature")]
    assigned: Annotated[dict[str, int], Doc("features per concept")]
    unassigned_share: Annotated[float, Doc("share of features with no concept")]
    dead_features: Annotated[int, Doc("features that never change")]
    skipped: Annotated[list[dict[str, Any]], Doc("`[{concept | layer, reason}]`: what could not be probed")]
    local: NotRequired[Annotated[dict[str, Any], Doc("the local view: `feature`, `concept`, `method`, `n`, `modality_share`")]]


@with_config(Strict)
class CompositionSummary(TypedDict):
    fidelity: Annotated[float, Doc("held-out agreement of the chosen sparse surrogate with the model")]
    n_features: Annotated[dict[str, int], Doc("`chosen`, `total`, `kept` (non-constant) features")]
    dropped: Annotated[dict[str, list[int]], Doc("`constant`: the features dropped as constant")]
    n_samples: Annotated[dict[str, int], Doc("`fit`, `heldout`")]
    path: Annotated[dict[str, Any], Doc("`lambda`, `n_features`, `fidelity` per point of the regularisation path, `chosen` (index), `margin`")]
    per_class: Annotated[dict[str, list[dict[str, Any]]], Doc("per class: `[{feature, weight, concept}]`, largest weights first")]
    simulation: Annotated[dict[str, float], Doc("`top3`, `top5`: top-k surrogate agreement with the model")]
    errors: Annotated[dict[str, Any], Doc("`n`, `top_push` (`[{feature, mean_push, concept}]`): what pushed the errors")]
    exact: Annotated[
        dict[str, Any],
        Doc(
            "whether the decision head decomposes exactly: `applies`, `max_error`, `simulation`, `reason`, `up_to` (exact up to a per-sample shift common to all "
            "classes, a log-softmax's normaliser: generative VLMs)"
        ),
    ]
    unpredicted: NotRequired[Annotated[list[str], Doc("classes the model never predicts on these samples")]]


@with_config(Strict)
class InterventionSummary(TypedDict):
    n: Annotated[int, Doc("samples intervened on (all analysed)")]
    null_sets: Annotated[int, Doc("random same-size unit sets per region and sample")]
    confidence: Annotated[float, Doc("of the intervals")]
    forward_passes_per_sample: Annotated[float, Doc("model inputs per sample")]
    regions: Annotated[
        dict[str, dict[str, Any]],
        Doc(
            "`<modality.region>`: `modality`, `region`, `concept` (its link), `n` (samples with the region), `units` (mean units removed); `flip_rate`, "
            "`null_flip_rate`, `flip_effect` (per sample: flip minus its nulls' mean flip), `margin_drop`, `margin_effect` (margin taken minus the nulls'), "
            "`fixes_error_rate`, `null_fixes_error_rate`, each `{value, low, high, n}`; `logit_change` `{pred, true}` (means)"
        ),
    ]
    modalities: Annotated[
        dict[str, dict[str, Any]],
        Doc(
            "exact modality Shapley value on every sample (`shapley`, `abs_shapley`), `share` of the logit change `{value, low, high, n}`, `removal_flip_rate`, `removal_fixes_error_rate`; "
            "the Brier score of the label a readout refitted to the labels gains from the modality (`readout_gain`), the model's gain (`model_gain`), and "
            "`unused`, their per-sample difference `{value, low, high, n}` (Bonferroni over the modalities): what it shows of the label that the model leaves unused"
        ),
    ]
    pairs: Annotated[dict[str, dict[str, float]], Doc("`<a×b>`: Shapley interaction index of each modality pair on every sample: `mean`, `abs_mean`, `abs_share`")]
    counterfactuals: Annotated[
        dict[str, dict[str, Any]],
        Doc(
            "`<concept>`: `n`, `flip_rate`, `label_changed_rate`, `flip_rate_label_kept`, `fixes_error_rate` (intervals as above), `logit_change.pred`; with a "
            "null (a transform discovery found, a few random draws per sample): `null_flip_rate`, `flip_effect` (per sample: flip minus its draws' mean flip), "
            "`null_fixes_error_rate`"
        ),
    ]
