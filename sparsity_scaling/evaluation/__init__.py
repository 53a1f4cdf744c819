"""Sparsity measurements of whole models: one of our checkpoints or a Hugging Face model
(`inputs.ModelRef`) on its validation data, under typed settings (`settings`), measured by
`metric`; `jobs` holds the measurements people ask for: one model, one checkpoint of a grid,
and every checkpoint of a run with the stabilising strategy."""
