"""Downstream quality at a sparsity setting: lm-evaluation-harness tasks scored dense and
with the evaluator's sparsity rule applied through the probe (`sparsity-scaling downstream`)."""
