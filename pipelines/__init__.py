"""The Kubeflow Pipelines DAGs, and how to compile, run (locally) and submit them."""
