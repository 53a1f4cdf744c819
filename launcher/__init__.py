"""Ray-coordinated grids of pretraining runs, evaluated on the cluster, tracked in MLflow."""
