"""The fold ensemble's model code: MLflow runs this file when the model loads (a model
from code, logged by genreflow.serving.log_ensemble); genreflow itself never imports it.
The genreflow it imports is the copy bundled with the model (code_paths)."""

import mlflow.models

from genreflow.serving import GenreEnsembleModel

mlflow.models.set_model(GenreEnsembleModel())
