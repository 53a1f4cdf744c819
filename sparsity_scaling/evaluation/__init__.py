"""Sparsity measurements of whole models: one of our checkpoints or a Hugging Face model,
on its validation data, under typed settings (`settings`), for one model (`evaluate`), one
checkpoint of a grid, or every checkpoint of a run with the stabilising strategy (`runs`)."""
