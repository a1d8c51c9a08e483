"""Names that the cluster's manifests (infra/) and the pipeline's pods must agree on.

The pipeline's steps sign in to the MLflow server as a non-admin user whose credentials
are a Kubernetes Secret in the runs' namespace (infra/runner makes it): each key becomes
the environment variable of the same name, which MLflow's client reads. MLflow answers only
pods that carry the network label below (infra/base/network-policy.yaml).
"""

MLFLOW_CREDENTIALS_SECRET = "mlflow-pipeline-credentials"
# Secret key -> environment variable, one for one.
MLFLOW_CREDENTIALS_ENV = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
# The key the fold steps sign their MLflow runs with, and check a run's record by before
# reusing it (genreflow.tracking.fold_runs): a Secret made at deploy time (infra/runner),
# taken into the environment of the fold steps alone.
REUSE_KEY_SECRET = "genreflow-reuse-key"
REUSE_KEY_SECRET_ENV = {"GENREFLOW_REUSE_KEY": "GENREFLOW_REUSE_KEY"}
# The pod label MLflow's NetworkPolicy lets in.
MLFLOW_CLIENT_LABEL = {"genreflow.io/mlflow-client": "true"}
# The pod label every step of the pipeline carries: the pipeline's NetworkPolicy and the
# admission policy that checks its security settings select it (infra/runner).
PIPELINE_STEP_LABEL = {"genreflow.io/pipeline-step": "true"}
