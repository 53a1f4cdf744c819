"""Activation-pattern analyses under a sparsity setting: neuron activation frequency,
token-wise activation ratio, dead neurons, layer-by-position heatmaps and PPL-activation
Pareto curves (`sparsity-scaling analyze ...`). `activity.measure_activity` is the one
streaming pass the others build on."""
