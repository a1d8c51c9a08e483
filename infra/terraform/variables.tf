variable "project" {
  description = "The Google Cloud project that holds the cluster and the bucket."
  type        = string
}

variable "region" {
  description = "Region of the bucket (and of a regional cluster)."
  type        = string
  default     = "europe-west4"
}

variable "cluster_name" {
  description = "An existing GKE Standard cluster with workload identity on (infra/README.md)."
  type        = string
}

variable "cluster_location" {
  description = "The cluster's region or zone."
  type        = string
}

variable "bucket_name" {
  description = "Bucket for the dataset (dataset_prefix) and KFP's pipeline root (run_prefix); MLflow's artifacts go to <this>-mlflow."
  type        = string
}

variable "gpu_type" {
  description = "GPU of the training node pool; GKE labels its nodes cloud.google.com/gke-accelerator=<this>."
  type        = string
  default     = "nvidia-l4"
}

variable "gpu_machine_type" {
  description = "Machine type that carries the GPU (g2-standard-* for L4); the fold step asks for 8 CPUs and 32 GB."
  type        = string
  default     = "g2-standard-12"
}

variable "gpu_node_locations" {
  description = "Zones of the GPU pool, where the GPU type is offered (empty: the cluster's zones)."
  type        = list(string)
  default     = []
}

variable "gpu_max_nodes" {
  description = "Most GPU nodes at once, per zone: folds beyond this wait for a node."
  type        = number
  default     = 10
}

variable "gpu_spot" {
  description = "Spot VMs: much cheaper, may be preempted; the fold step retries and resumes."
  type        = bool
  default     = true
}

variable "kfp_namespace" {
  description = "Namespace where the runs' pods are created (KFP standalone: kubeflow; multi-user: your profile)."
  type        = string
  default     = "kubeflow"
}

variable "mlflow_namespace" {
  description = "Namespace of the MLflow server (infra/base)."
  type        = string
  default     = "genreflow"
}

variable "kfp_root_retention_days" {
  description = "Days the runs' intermediate outputs under kfp/ are kept (0: forever)."
  type        = number
  default     = 60
  validation {
    # KFP's cache serves download/pack/embed results up to 30 days old (the pipeline's
    # cache period, genreflow.pipelines.cv.CACHE_PERIOD_DAYS): they must outlive that.
    condition     = var.kfp_root_retention_days == 0 || var.kfp_root_retention_days > 30
    error_message = "kfp_root_retention_days must be 0 (keep) or more than the 30-day cache period."
  }
}

variable "dataset_prefix" {
  description = "Where the dataset lies in the bucket: the pipeline may read this and no other object."
  type        = string
  default     = "data/"
}

variable "run_prefix" {
  description = "KFP's pipeline root in the bucket (--pipeline-root gs://<bucket>/<this>): the only prefix the pipeline writes."
  type        = string
  default     = "kfp/"
}

variable "mlflow_noncurrent_days" {
  description = "Days an overwritten or deleted MLflow artifact's old version is kept."
  type        = number
  default     = 90
}

variable "github_repository" {
  description = "The GitHub repository whose retrain workflow may act as the CI account (OWNER/NAME)."
  type        = string
  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", var.github_repository))
    error_message = "github_repository must be OWNER/NAME."
  }
}

variable "kfp_iap_backend_service" {
  description = "KFP's front door behind Identity-Aware Proxy, the backend service's name, which the CI account may call (empty: grant it yourself)."
  type        = string
  default     = ""
}
