"""Every tag and metric name genreflow gives an MLflow run, defined once.

Parents (pipeline runs) and children (fold runs) are told apart by ROLE_TAG; the run tree
is MLflow's own PARENT_TAG. Checksums and the protocol are tags on parents and on
registered versions alike, so that two runs (or versions) can be checked for comparable
folds by the same names.
"""

PARENT_TAG = "mlflow.parentRunId"
DATASET_CONTEXT_TAG = "mlflow.data.context"

ROLE_TAG = "genreflow.role"
PIPELINE_ROLE, FOLD_ROLE = "pipeline", "fold"
OWNER_TAG = "genreflow.owner"  # OWNER on runs genreflow created, and so may close
OWNER = "genreflow"
ADOPTED_TAG = "genreflow.adopted_from"  # the MLFLOW_RUN_ID the parent was adopted through
FINAL_STATE_TAG = "genreflow.final_state"
PIPELINE_RUN_TAG = "kfp.pipeline_run"
PIPELINE_RUN_ID_TAG = "kfp.pipeline_run_id"
RUN_URL_TAG = "kfp.run_url"

FOLD_TAG = "fold"
FOLD_KEY_TAG = "genreflow.fold_key"
ATTEMPT_TAG = "genreflow.attempt"  # starts of a fold's step (task retries)
TRIES_TAG = "genreflow.tries"  # tries of its training, over every start
REUSED_TAG = "reused"
REUSED_FROM_TAG = "genreflow.reused_from"
LOGGED_TAG = "genreflow.logged"  # set last: a fold run whose outputs are all there
# genreflow.sha256.<artifact>: each fold file's SHA-256 as logged, checked when it is fetched
SHA256_TAG_PREFIX = "genreflow.sha256."
# The pipeline's own word for those: an HMAC over the fold's identity and the file digests
# (genreflow.tracking.fold_runs.reuse_record), checked before a fold is reused or fetched
REUSE_RECORD_TAG = "genreflow.reuse_record"
# A fold run whose checkpoint moved into the pipeline's model (stored once): the
# LoggedModel's id and the checkpoint's path in it (its SHA-256 tag stays).
CHECKPOINT_MODEL_TAG = "genreflow.checkpoint.model_id"
CHECKPOINT_PATH_TAG = "genreflow.checkpoint.path"

PROTOCOL_TAG = "protocol"
SELECTION_TAG = "selection"
PATH_TAG = "path"
PARTIAL_TAG = "partial"
# MLflow's own source tags (mlflow.utils.mlflow_tags), on parent runs, models and versions.
GIT_COMMIT_TAG = "mlflow.source.git.commit"
SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_TYPE_TAG = "mlflow.source.type"
DATA_SHA256_TAG = "data.sha256"
SPLIT_SHA256_TAG = "split.sha256"
# On registered versions: the pipeline run that made one; what promotion decided.
PARENT_RUN_TAG = "genreflow.parent_run"
PROMOTION_TAG = "genreflow.promotion"
# Pairing folds means the same clips in the same folds: the same data and the same split.
CHECKSUM_TAGS = (DATA_SHA256_TAG, SPLIT_SHA256_TAG)

# The curve a fold logs at every evaluation, as it happens (live.LiveLog), iteration as step.
CURVE = ("train_loss", "valid_accuracy", "test_accuracy")
# A fold run's headline metrics: summary.json's key -> the metric's name. summary.json's
# peak_test_accuracy is left out: chosen on the test rows, it would rank runs on an
# optimistic number (the test_accuracy curve holds it). The selected checkpoint's
# validation accuracy has a name of its own: as valid_accuracy at the last step it would
# put a second point on the curve's last step.
SUMMARY_METRICS = {
    "final_accuracy": "final_accuracy",
    "valid_accuracy": "selected_valid_accuracy",
    "selected_iteration": "selected_iteration",
    "clips_per_second": "clips_per_second",
    "wall_seconds": "wall_seconds",
}
# summary.json's keys that a fold run carries as tags under the same names.
SUMMARY_TAGS = ("path", "protocol", "selection", "split_sha256", "data_sha256")
