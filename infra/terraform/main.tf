# What genreflow needs in Google Cloud beside an existing GKE cluster: a bucket for the dataset
# and the runs, a versioned one for MLflow's artifacts, a GPU node pool that scales to zero
# with its own least-privilege node account, and two Google service accounts that the
# Kubernetes service accounts of infra/ act as through workload identity (no key files),
# each allowed only its own part of the storage.

locals {
  workload_pool = "${var.project}.svc.id.goog"
}

resource "google_storage_bucket" "genreflow" {
  name                        = var.bucket_name
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  # Intermediate outputs of runs (features, fold folders) are cheap to remake; MLflow's
  # artifacts, the record, are in their own bucket (below).
  dynamic "lifecycle_rule" {
    for_each = var.kfp_root_retention_days > 0 ? [1] : []
    content {
      condition {
        age            = var.kfp_root_retention_days
        matches_prefix = [var.run_prefix]
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
    service_account = google_service_account.gpu_nodes.email
    machine_type    = var.gpu_machine_type
    spot            = var.gpu_spot
    disk_size_gb    = 200
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

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

# The pipeline's pods: read the dataset, read and write their runs under KFP's pipeline root.
resource "google_service_account" "pipeline" {
  account_id   = "genreflow-pipeline"
  display_name = "genreflow pipeline runs"
}

# The GPU nodes' own identity, instead of the project's default compute account (which holds
# Editor): only what a node needs to run (GKE's node role: logs, metrics, its metadata) and
# to pull images. Pods never act as it (GKE_METADATA above); they act as the accounts here.
resource "google_service_account" "gpu_nodes" {
  account_id   = "genreflow-gpu-nodes"
  display_name = "genreflow GPU nodes"
}

resource "google_project_iam_member" "gpu_nodes" {
  for_each = toset(["roles/container.defaultNodeServiceAccount", "roles/artifactregistry.reader"])
  project  = var.project
  role     = each.value
  member   = "serviceAccount:${google_service_account.gpu_nodes.email}"
}

# MLflow's artifacts: the record of every run, in a bucket of their own, because versioning
# is a whole bucket's setting and only these should keep their overwritten and deleted
# versions (for mlflow_noncurrent_days), against a mistake or a compromised writer.
resource "google_storage_bucket" "mlflow" {
  name                        = "${var.bucket_name}-mlflow"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.mlflow_noncurrent_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }
}

resource "google_storage_bucket_iam_member" "mlflow_objects" {
  bucket = google_storage_bucket.mlflow.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.mlflow.email}"
}

# The pipeline reads the dataset and nothing else of it: a condition on the object's name.
# Listing is granted on the bucket (a list is checked against the bucket, not an object), so
# the pipeline can see object names outside the prefix, never their content.
resource "google_storage_bucket_iam_member" "pipeline_dataset_read" {
  bucket = google_storage_bucket.genreflow.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.pipeline.email}"
  condition {
    title      = "dataset-read-only"
    expression = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.genreflow.name}/objects/${var.dataset_prefix}\") || resource.name == \"projects/_/buckets/${google_storage_bucket.genreflow.name}\""
  }
}

# ... and writes only where its runs go: KFP's pipeline root (the fold work folders are in it).
resource "google_storage_bucket_iam_member" "pipeline_runs_write" {
  bucket = google_storage_bucket.genreflow.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.pipeline.email}"
  condition {
    title      = "runs-read-write"
    expression = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.genreflow.name}/objects/${var.run_prefix}\")"
  }
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

# CI (.github/workflows/retrain.yaml) signs in to Google with GitHub's OIDC token through
# workload identity federation: no key is stored anywhere. The provider admits a token only
# from this repository's workflow, running in the environment `retrain` (whose required
# reviewers approve each run) on the main branch: a workflow on any other branch, a pull
# request or another repository gets nothing.
resource "google_iam_workload_identity_pool" "github" {
  workload_identity_pool_id = "genreflow-github"
  display_name              = "genreflow GitHub Actions"
}

resource "google_iam_workload_identity_pool_provider" "github" {
  workload_identity_pool_id          = google_iam_workload_identity_pool.github.workload_identity_pool_id
  workload_identity_pool_provider_id = "github"
  display_name                       = "GitHub Actions (retrain on main)"
  attribute_mapping = {
    "google.subject"        = "assertion.sub"
    "attribute.repository"  = "assertion.repository"
    "attribute.environment" = "assertion.environment"
    "attribute.ref"         = "assertion.ref"
  }
  attribute_condition = "assertion.repository == \"${var.github_repository}\" && assertion.environment == \"retrain\" && assertion.ref == \"refs/heads/main\""
  oidc {
    issuer_uri = "https://token.actions.githubusercontent.com"
  }
}

# The account the retrain job acts as (the workflow's variable GCP_SERVICE_ACCOUNT), and
# the tokens that pass the provider's condition may act as it. Its one other grant, calling
# KFP behind Identity-Aware Proxy, is on KFP's front door (below, when named).
resource "google_service_account" "ci" {
  account_id   = "genreflow-ci"
  display_name = "genreflow CI retraining"
}

resource "google_service_account_iam_member" "ci_workload_identity" {
  service_account_id = google_service_account.ci.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "principalSet://iam.googleapis.com/${google_iam_workload_identity_pool.github.name}/attribute.repository/${var.github_repository}"
}

resource "google_iap_web_backend_service_iam_member" "ci_kfp" {
  count               = var.kfp_iap_backend_service == "" ? 0 : 1
  web_backend_service = var.kfp_iap_backend_service
  role                = "roles/iap.httpsResourceAccessor"
  member              = "serviceAccount:${google_service_account.ci.email}"
}
