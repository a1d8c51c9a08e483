"""The pipeline's exit handler: close the MLflow parent run with the pipeline's true status."""

from kfp import dsl

from genreflow.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def close_run(tracking_uri: str, pipeline_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """End the parent run FINISHED, FAILED or KILLED (canceled), whatever the DAG did.

    Runs after everything else, even when a step failed or the run was terminated; a fold
    run a killed pod left RUNNING ends too.

    Args:
        tracking_uri: MLflow tracking URI ("" = the MLFLOW_TRACKING_URI the platform
            injects, else no tracking).
        pipeline_run_id: the KFP run's id, which the parent run carries as a tag.
        status: the final state of the steps this handler guards (set by KFP).
    """
    from genreflow.steps.run import close_run as close
    from genreflow.tracking.client import platform_tracking_uri

    print(f"pipeline run {pipeline_run_id}: {status.state} {status.error_message or ''}")
    close(platform_tracking_uri(tracking_uri), pipeline_run_id, status.state)
