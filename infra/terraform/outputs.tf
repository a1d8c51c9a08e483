output "bucket" {
  description = "The bucket: upload the dataset here and use gs://<bucket>/kfp as --pipeline-root."
  value       = "gs://${google_storage_bucket.genreflow.name}"
}

output "mlflow_bucket" {
  description = "MLflow's artifacts (versioned); the overlay's artifacts-destination is gs://<this>/mlflow."
  value       = "gs://${google_storage_bucket.mlflow.name}"
}

output "gpu_node_service_account" {
  value = google_service_account.gpu_nodes.email
}

output "mlflow_service_account" {
  value = google_service_account.mlflow.email
}

output "pipeline_service_account" {
  value = google_service_account.pipeline.email
}

output "overlay_values" {
  description = "The command that puts this project and bucket into infra/overlays/gke."
  value       = "sed -i 's/GCP_PROJECT/${var.project}/g; s/GCS_BUCKET/${google_storage_bucket.genreflow.name}/g' infra/overlays/gke/*.yaml"
}

output "ci_service_account" {
  description = "The retrain workflow's variable GCP_SERVICE_ACCOUNT."
  value       = google_service_account.ci.email
}

output "github_workload_identity_provider" {
  description = "The retrain workflow's variable GCP_WORKLOAD_IDENTITY_PROVIDER."
  value       = google_iam_workload_identity_pool_provider.github.name
}
