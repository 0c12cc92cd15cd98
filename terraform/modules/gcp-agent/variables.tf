variable "name" {
  description = "Name of the group: prefix of every resource and of every agent id (each machine appends its instance name)."
  type        = string

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{0,22}[a-z0-9])?$", var.name))
    error_message = "The name must be 1-24 lower case letters, digits or '-', starting with a letter, e.g. \"spillway-eu\"."
  }
}

variable "project_id" {
  description = "Project the machines and their service account live in."
  type        = string

  validation {
    condition     = length(var.project_id) > 0
    error_message = "Set project_id to the id of your GCP project."
  }
}

variable "region" {
  description = "GCP region of the managed instance group (e.g. \"europe-west4\"). Must be one of allowed_regions."
  type        = string

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]$", var.region))
    error_message = "The region must be a GCP region name, e.g. \"europe-west4\"."
  }
}

variable "allowed_regions" {
  description = "Regions this deployment may run in (its residency lock). Planning fails when region is not one of them."
  type        = list(string)

  validation {
    condition     = length(var.allowed_regions) > 0
    error_message = "Set allowed_regions to the GCP regions these machines may run in, e.g. [\"europe-west4\"]."
  }
}

variable "zones" {
  description = "Zones of region to spread machines over (where the GPUs or the reservation are). Empty: GCP picks."
  type        = list(string)
  default     = []
}

variable "subnetwork" {
  description = "Self link or name of the private subnetwork the machines attach to (no external address; needs Cloud NAT or Private Google Access to reach out)."
  type        = string

  validation {
    condition     = length(var.subnetwork) > 0
    error_message = "Set subnetwork to the self link of a subnetwork in region, e.g. \"projects/p/regions/europe-west4/subnetworks/gpu\"."
  }
}

variable "network" {
  description = "Self link or name of the VPC network of subnetwork (for the serving firewall rule)."
  type        = string

  validation {
    condition     = length(var.network) > 0
    error_message = "Set network to the VPC network of subnetwork."
  }
}

variable "machine_type" {
  description = "GPU machine type, e.g. \"a3-highgpu-8g\" (GPUs included) or \"g2-standard-8\"."
  type        = string
}

variable "accelerator_type" {
  description = "GPU type to attach for machine types that take separate accelerators (e.g. \"nvidia-tesla-t4\"). Empty: none (A3, A2, G2 include theirs)."
  type        = string
  default     = ""
}

variable "accelerator_count" {
  description = "Number of accelerator_type GPUs to attach."
  type        = number
  default     = 0
}

variable "reservation_name" {
  description = "Name of a specific reservation to consume. Empty: any matching reservation, else on demand."
  type        = string
  default     = ""
}

variable "source_image" {
  description = "Boot image with the NVIDIA driver, python3 and cloud-init (e.g. a Deep Learning VM image)."
  type        = string
}

variable "boot_disk_size_gb" {
  description = "Size of the boot disk (model weights are cached there)."
  type        = number
  default     = 500
}

variable "boot_disk_kms_key" {
  description = "Cloud KMS key self link to encrypt the boot disk with. Empty: Google-managed encryption."
  type        = string
  default     = ""
}

variable "enable_secure_boot" {
  description = "Shielded VM secure boot. Needs an image whose NVIDIA driver is signed for it."
  type        = bool
  default     = false
}

variable "target_size" {
  description = "Number of machines to run."
  type        = number
  default     = 1
}

variable "token_secret_id" {
  description = "Secret Manager secret holding the agent token, as projects/PROJECT/secrets/NAME. Machines read it at boot; it never appears in metadata."
  type        = string

  validation {
    condition     = can(regex("^projects/[^/]+/secrets/[^/]+$", var.token_secret_id))
    error_message = "Set token_secret_id to the secret that holds the agent token, as projects/PROJECT/secrets/NAME."
  }
}

variable "weights_bucket" {
  description = "Name of the Cloud Storage bucket holding model weights; the machines may read its objects, nothing else."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$", var.weights_bucket))
    error_message = "Set weights_bucket to the name of the bucket that holds the model weights."
  }
}

variable "scheduler_address" {
  description = "host:port of the scheduler's gRPC endpoint. Empty: set scheduler_addresses instead."
  type        = string
  default     = ""

  validation {
    condition     = var.scheduler_address == "" || can(regex("^(\\[[0-9a-fA-F:]+\\]|[A-Za-z0-9.-]+):[0-9]{1,5}$", var.scheduler_address))
    error_message = "The scheduler_address must be host:port, e.g. \"scheduler.internal:50051\"."
  }
}

variable "scheduler_addresses" {
  description = "host:port of every scheduler when several run active-active (instead of scheduler_address): the agents report to each."
  type        = list(string)
  default     = []
}

variable "scheduler_ca_pem" {
  description = "PEM of the CA that signed the scheduler's certificate. Empty: plaintext gRPC."
  type        = string
  default     = ""
}

variable "temporal_address" {
  description = "host:port of the Temporal frontend. Empty: the agent only reports."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_address == "" || can(regex("^(\\[[0-9a-fA-F:]+\\]|[A-Za-z0-9.-]+):[0-9]{1,5}$", var.temporal_address))
    error_message = "The temporal_address must be empty or host:port, e.g. \"temporal.internal:7233\"."
  }
}

variable "temporal_namespace" {
  description = "Temporal namespace of the node workers."
  type        = string
  default     = "default"
}

variable "temporal_server_name" {
  description = "Name to check the Temporal frontend's certificate against, when it differs from the host in temporal_address (turns on TLS)."
  type        = string
  default     = ""
}

variable "temporal_ca_pem" {
  description = "PEM of the CA that signed the Temporal frontend's certificate (public; turns on TLS). Empty: the system roots when TLS is on."
  type        = string
  default     = ""
}

variable "temporal_tls" {
  description = "TLS to the Temporal frontend with the system roots even without temporal_ca_pem or a client certificate."
  type        = bool
  default     = false
}

variable "temporal_client_cert_secret_id" {
  description = "Secret Manager secret (projects/P/secrets/S) holding the node worker's client certificate for mutual TLS to Temporal (PEM; with the key); fetched at boot like the token, never in user data, and the machines may read it. Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_client_cert_secret_id == "" || can(regex("^projects/[^/]+/secrets/[^/]+$", var.temporal_client_cert_secret_id))
    error_message = "The temporal_client_cert_secret_id must be empty or projects/P/secrets/S."
  }
}

variable "temporal_client_key_secret_id" {
  description = "Secret Manager secret (projects/P/secrets/S) holding the node worker's client private key for mutual TLS to Temporal (PEM; with the certificate); fetched at boot like the token, never in user data, and the machines may read it. Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_client_key_secret_id == "" || can(regex("^projects/[^/]+/secrets/[^/]+$", var.temporal_client_key_secret_id))
    error_message = "The temporal_client_key_secret_id must be empty or projects/P/secrets/S."
  }
}

variable "temporal_api_key_secret_id" {
  description = "Secret Manager secret (projects/P/secrets/S) holding the node worker's Temporal API key (Temporal Cloud); fetched at boot like the token, never in user data, and the machines may read it. Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_api_key_secret_id == "" || can(regex("^projects/[^/]+/secrets/[^/]+$", var.temporal_api_key_secret_id))
    error_message = "The temporal_api_key_secret_id must be empty or projects/P/secrets/S."
  }
}

variable "install_sglang" {
  description = "Install SGLang (spillway's sglang extra) on machines whose image lacks it; pip runs only when the agent's venv cannot find the sglang module."
  type        = bool
  default     = false
}

variable "serving_cidr_blocks" {
  description = "Private networks allowed to reach the replicas' ports (30000-30999). Never the internet."
  type        = list(string)
  default     = []

  validation {
    condition     = !contains(var.serving_cidr_blocks, "0.0.0.0/0") && !contains(var.serving_cidr_blocks, "::/0")
    error_message = "The serving_cidr_blocks must not contain 0.0.0.0/0 or ::/0: replicas are never open to the internet."
  }
}

variable "pool" {
  description = "Capacity pool these GPUs belong to, as named in the policy file."
  type        = string
}

variable "residency_group" {
  description = "Residency group label (e.g. \"eu\")."
  type        = string
  default     = ""
}

variable "extra_labels" {
  description = "Additional labels reported by the agent."
  type        = map(string)
  default     = {}
}

variable "wheel_url" {
  description = "HTTPS URL of a spillway wheel to install. Empty: install from package_index_url."
  type        = string
  default     = ""
}

variable "package_index_url" {
  description = "HTTPS URL of the package index to install spillway[agent] from. Empty: PyPI."
  type        = string
  default     = ""
}

variable "package_version" {
  description = "Version of spillway to install from the index. Empty: the newest."
  type        = string
  default     = ""
}

variable "system_packages" {
  description = "OS packages cloud-init installs first."
  type        = list(string)
  default     = ["python3-venv"]
}

variable "labels" {
  description = "GCP labels for every resource that takes them."
  type        = map(string)
  default     = {}
}
