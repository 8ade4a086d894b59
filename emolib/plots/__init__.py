"""Figures for the book: one function per figure type, readable at page width, no styling left to chapters.

One module per chapter (`baselines`, `flow`, `features`, `tracing`, `steering`, `saes`) and the shared house style (`style`);
every figure function is importable from here.
"""

from emolib.plots.baselines import (
    calibration_effects,
    confusion_grid,
    label_order_effects,
    metric_intervals,
    per_class_f1,
)
from emolib.plots.features import (
    coactivation_figure,
    counts_figure,
    diffuseness_figure,
    jaccard_figure,
    layer_counts_figure,
    upset_figure,
    upset_grid,
)
from emolib.plots.flow import (
    boundary_frequency,
    flow_profiles,
    role_shares,
    seed_dictionary,
    selective_heatmap,
    shade_phases,
)
from emolib.plots.saes import sae_quality
from emolib.plots.steering import data_efficiency, label_shares, strength_tradeoff, transfer_panels
from emolib.plots.style import colour, style
from emolib.plots.tracing import effect_curves, k50_intervals, matrix_heatmap, predicted_vs_measured

__all__ = [
    "boundary_frequency",
    "calibration_effects",
    "coactivation_figure",
    "colour",
    "confusion_grid",
    "counts_figure",
    "data_efficiency",
    "diffuseness_figure",
    "effect_curves",
    "flow_profiles",
    "jaccard_figure",
    "k50_intervals",
    "label_shares",
    "label_order_effects",
    "layer_counts_figure",
    "matrix_heatmap",
    "metric_intervals",
    "per_class_f1",
    "predicted_vs_measured",
    "role_shares",
    "sae_quality",
    "seed_dictionary",
    "selective_heatmap",
    "shade_phases",
    "strength_tradeoff",
    "style",
    "transfer_panels",
    "upset_figure",
    "upset_grid",
]
