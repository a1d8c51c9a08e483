# What genreflow needs in Google Cloud beside an existing GKE cluster: one bucket, a GPU node
# pool that scales to zero, and two Google service accounts that the Kubernetes service
# accounts of infra/ act as through workload identity (no key files).

locals {
  workload_pool = "${var.project}.svc.id.goog"
}

resource "google_storage_bucket" "genreflow" {
  name                        = var.bucket_name
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  # Intermediate outputs of runs (features, fold folders) are cheap to remake; the MLflow
  # artifacts under mlflow/ are the record and are kept.
  dynamic "lifecycle_rule" {
    for_each = var.kfp_root_retention_days > 0 ? [1] : []
    content {
      condition {
        age            = var.kfp_root_retention_days
        matches_prefix = ["kfp/"]
      }
      action {
        type = "Delete"
      }
    }
  }
}

# The GPU nodes the fold steps land on. GKE taints them nvidia.com/gpu=present:NoSchedule and
# adds the matching toleration to any pod that requests nvidia.com/gpu, which the compiled
# pipeline does; `genreflow submit --gpu-node-selector cloud.google.com/gke-accelerator=<type>`
# pins the type when a cluster has several.
resource "google_container_node_pool" "gpu" {
  name           = "genreflow-gpu"
  cluster        = var.cluster_name
  location       = var.cluster_location
  node_locations = length(var.gpu_node_locations) > 0 ? var.gpu_node_locations : null

  autoscaling {
    min_node_count = 0
    max_node_count = var.gpu_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type = var.gpu_machine_type
    spot         = var.gpu_spot
    disk_size_gb = 200
    oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]

    guest_accelerator {
      type  = var.gpu_type
      count = 1
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }

    # Pods on these nodes get their Google identity from workload identity only.
    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    labels = {
      "genreflow/pool" = "gpu"
    }
  }
}

# The MLflow server: the only identity that writes MLflow's artifacts (through its proxy).
resource "google_service_account" "mlflow" {
  account_id   = "genreflow-mlflow"
  display_name = "genreflow MLflow tracking server"
}

# The pipeline's pods: read the dataset, read and write KFP's pipeline root.
resource "google_service_account" "pipeline" {
  account_id   = "genreflow-pipeline"
  display_name = "genreflow pipeline runs"
}

resource "google_storage_bucket_iam_member" "mlflow_objects" {
  bucket = google_storage_bucket.genreflow.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.mlflow.email}"
}

resource "google_storage_bucket_iam_member" "pipeline_objects" {
  bucket = google_storage_bucket.genreflow.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.pipeline.email}"
}

resource "google_service_account_iam_member" "mlflow_workload_identity" {
  service_account_id = google_service_account.mlflow.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.workload_pool}[${var.mlflow_namespace}/mlflow]"
}

resource "google_service_account_iam_member" "pipeline_workload_identity" {
  service_account_id = google_service_account.pipeline.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.workload_pool}[${var.kfp_namespace}/genreflow-pipeline-runner]"
}
