"""MLflow, and nothing else: the adapter the steps (genreflow.steps) log through.

- `client`: the MLflow client, bounded retries, the process-wide tracking URI, the default
  store;
- `names`: every tag and metric name genreflow gives a run, defined once;
- `addresses`: where a run is in the MLflow UI;
- `runs`: the run tree, one parent run per pipeline run and one child run per fold;
- `live`: a fold's curve and system metrics while it trains;
- `models`: logged models and the model registry.

It knows MLflow and the fold folder's files (genreflow.fold_result), never a step, the
training, the aggregate or the serving model: those import it, not the other way round.
Everything goes through an explicit `MlflowClient(tracking_uri)` rather than MLflow's
global "active run": a step that inherits `MLFLOW_RUN_ID` must not silently log into, or
close, a run it does not own (mlflow/mlflow#15713, #13874).
"""
