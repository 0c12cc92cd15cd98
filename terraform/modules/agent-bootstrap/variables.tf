variable "agent_id" {
  description = "Agent id written to the agent config: lower case letters, digits, '.', '_', '-' (at most 63). With append_instance_id it is the prefix of every machine's id."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$", var.agent_id))
    error_message = "The agent_id must be 1-63 lower case letters, digits, '.', '_' or '-', starting and ending with a letter or digit, e.g. \"gpu-eu\"."
  }
}

variable "append_instance_id" {
  description = "Append each machine's instance id (from the cloud's metadata service) to agent_id at boot, so every machine of a group gets its own id."
  type        = bool
  default     = false
}

variable "cloud" {
  description = "Where the machines run, reported as the agent's provider label: onprem, aws, gcp, azure or local. For aws, gcp and azure the instance id and zone are read from the metadata service at boot."
  type        = string

  validation {
    condition     = contains(["onprem", "aws", "gcp", "azure", "local"], var.cloud)
    error_message = "The cloud must be one of \"onprem\", \"aws\", \"gcp\", \"azure\" or \"local\"."
  }
}

variable "pool" {
  description = "Capacity pool these GPUs belong to, as named in the policy file (e.g. \"reserved-eu\")."
  type        = string

  validation {
    condition     = length(var.pool) > 0 && length(var.pool) <= 63
    error_message = "The pool must be 1-63 characters, e.g. \"reserved-eu\"."
  }
}

variable "region" {
  description = "Region the machines run in (the cloud's own name, e.g. \"eu-central-1\"). Must be one of allowed_regions."
  type        = string

  validation {
    condition     = length(var.region) > 0 && length(var.region) <= 63
    error_message = "The region must be 1-63 characters, e.g. \"eu-central-1\"."
  }
}

variable "allowed_regions" {
  description = "Regions this deployment may run in (its residency lock). Planning fails when region is not one of them."
  type        = list(string)

  validation {
    condition     = length(var.allowed_regions) > 0
    error_message = "Set allowed_regions to the regions these machines may run in, e.g. [\"eu-central-1\", \"eu-west-1\"]."
  }
}

variable "zone" {
  description = "Zone label. Empty: read from the metadata service at boot on aws, gcp and azure."
  type        = string
  default     = ""

  validation {
    condition     = length(var.zone) <= 63
    error_message = "The zone must be at most 63 characters."
  }
}

variable "residency_group" {
  description = "Residency group label: where data on these machines may go (e.g. \"eu\")."
  type        = string
  default     = ""

  validation {
    condition     = length(var.residency_group) <= 63
    error_message = "The residency_group must be at most 63 characters, e.g. \"eu\"."
  }
}

variable "extra_labels" {
  description = "Additional free-form labels reported by the agent."
  type        = map(string)
  default     = {}
}

variable "scheduler_address" {
  description = "host:port of the scheduler's gRPC endpoint, reachable from the machines (agents only dial out). Empty: set scheduler_addresses instead."
  type        = string
  default     = ""

  validation {
    condition     = var.scheduler_address == "" || can(regex("^(\\[[0-9a-fA-F:]+\\]|[A-Za-z0-9.-]+):[0-9]{1,5}$", var.scheduler_address))
    error_message = "The scheduler_address must be host:port, e.g. \"scheduler.internal:50051\"."
  }
}

variable "scheduler_addresses" {
  description = "host:port of every scheduler when several run active-active (instead of scheduler_address): the agent reports to each of them. One token and one TLS setting serve all."
  type        = list(string)
  default     = []

  validation {
    condition     = length(distinct(var.scheduler_addresses)) == length(var.scheduler_addresses) && alltrue([for address in var.scheduler_addresses : can(regex("^(\\[[0-9a-fA-F:]+\\]|[A-Za-z0-9.-]+):[0-9]{1,5}$", address))])
    error_message = "The scheduler_addresses must each be host:port, each once, e.g. [\"cp-1.internal:50051\", \"cp-2.internal:50051\"]."
  }
}

variable "temporal_address" {
  description = "host:port of the Temporal frontend the agent's node worker polls for actions. Empty: the agent only reports."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_address == "" || can(regex("^(\\[[0-9a-fA-F:]+\\]|[A-Za-z0-9.-]+):[0-9]{1,5}$", var.temporal_address))
    error_message = "The temporal_address must be empty or host:port, e.g. \"temporal.internal:7233\"."
  }
}

variable "temporal_namespace" {
  description = "Temporal namespace of the node worker."
  type        = string
  default     = "default"

  validation {
    condition     = length(var.temporal_namespace) > 0
    error_message = "The temporal_namespace must not be empty."
  }
}

variable "temporal_server_name" {
  description = "Name to check the Temporal frontend's certificate against, when it differs from the host in temporal_address (turns on TLS)."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^[A-Za-z0-9.-]{0,253}$", var.temporal_server_name))
    error_message = "The temporal_server_name must be empty or a DNS name, e.g. \"frontend.temporal.internal\"."
  }
}

variable "temporal_ca_pem" {
  description = "PEM of the CA that signed the Temporal frontend's certificate (public, not a secret; turns on TLS). Empty: the system roots when TLS is on."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_ca_pem == "" || length(regexall("-----BEGIN CERTIFICATE-----", var.temporal_ca_pem)) > 0
    error_message = "The temporal_ca_pem must be empty or a PEM certificate (-----BEGIN CERTIFICATE-----)."
  }
}

variable "temporal_tls" {
  description = "TLS to the Temporal frontend with the system roots even without temporal_ca_pem or a client certificate. An API key implies TLS anyway."
  type        = bool
  default     = false
}

variable "temporal_client_cert_source" {
  description = "Where the node worker's client certificate for mutual TLS to Temporal (PEM; with temporal_client_key_source) lives, fetched at boot like the token (to /run/spillway, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
  type = object({
    kind = string
    ref  = string
  })
  default = null

  validation {
    condition     = var.temporal_client_cert_source == null ? true : contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.temporal_client_cert_source.kind)
    error_message = "The temporal_client_cert_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = var.temporal_client_cert_source == null ? true : length(trimspace(var.temporal_client_cert_source.ref)) > 0 && (var.temporal_client_cert_source.kind != "file" || substr(var.temporal_client_cert_source.ref, 0, 1) == "/")
    error_message = "Set temporal_client_cert_source.ref to where the node worker's client certificate for mutual TLS to Temporal (PEM; with temporal_client_key_source) lives: an absolute file path (e.g. \"/etc/spillway/temporal/client.pem\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "temporal_client_key_source" {
  description = "Where the node worker's client private key for mutual TLS to Temporal (PEM; with temporal_client_cert_source) lives, fetched at boot like the token (to /run/spillway, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
  type = object({
    kind = string
    ref  = string
  })
  default = null

  validation {
    condition     = var.temporal_client_key_source == null ? true : contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.temporal_client_key_source.kind)
    error_message = "The temporal_client_key_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = var.temporal_client_key_source == null ? true : length(trimspace(var.temporal_client_key_source.ref)) > 0 && (var.temporal_client_key_source.kind != "file" || substr(var.temporal_client_key_source.ref, 0, 1) == "/")
    error_message = "Set temporal_client_key_source.ref to where the node worker's client private key for mutual TLS to Temporal (PEM; with temporal_client_cert_source) lives: an absolute file path (e.g. \"/etc/spillway/temporal/client.key\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "temporal_api_key_source" {
  description = "Where the node worker's Temporal API key (Temporal Cloud; one word) lives, fetched at boot like the token (to /run/spillway, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
  type = object({
    kind = string
    ref  = string
  })
  default = null

  validation {
    condition     = var.temporal_api_key_source == null ? true : contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.temporal_api_key_source.kind)
    error_message = "The temporal_api_key_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = var.temporal_api_key_source == null ? true : length(trimspace(var.temporal_api_key_source.ref)) > 0 && (var.temporal_api_key_source.kind != "file" || substr(var.temporal_api_key_source.ref, 0, 1) == "/")
    error_message = "Set temporal_api_key_source.ref to where the node worker's Temporal API key (Temporal Cloud; one word) lives: an absolute file path (e.g. \"/etc/spillway/temporal/api-key\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "scheduler_ca_pem" {
  description = "PEM of the CA that signed the scheduler's certificate (public, not a secret). Empty: plaintext gRPC."
  type        = string
  default     = ""
}

variable "scheduler_server_name" {
  description = "Name to check the scheduler's certificate against, when it differs from the host in scheduler_address."
  type        = string
  default     = ""
}

variable "token_source" {
  description = "Where the agent's bearer token lives; it is fetched at boot and never put in user data. kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME)."
  type = object({
    kind = string
    ref  = string
  })

  validation {
    condition     = contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.token_source.kind)
    error_message = "The token_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = length(trimspace(var.token_source.ref)) > 0
    error_message = "Set token_source.ref to where the agent token lives: an absolute file path, a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }

  validation {
    condition     = var.token_source.kind != "file" || substr(var.token_source.ref, 0, 1) == "/"
    error_message = "With token_source.kind \"file\", set token_source.ref to an absolute path on the machine, e.g. \"/etc/spillway/agent.token\"."
  }
}

variable "identity_client_id" {
  description = "Azure only: client id of the user-assigned managed identity that may read the token secret."
  type        = string
  default     = ""
}

variable "gpu_discovery" {
  description = "How the agent finds its GPUs: auto (NVML when the driver is there, else static_gpus), nvml or static."
  type        = string
  default     = "auto"

  validation {
    condition     = contains(["auto", "nvml", "static"], var.gpu_discovery)
    error_message = "The gpu_discovery must be \"auto\", \"nvml\" or \"static\"."
  }
}

variable "static_gpus" {
  description = "GPUs declared by hand, for machines without NVML: model, memory_gib and count per entry."
  type = list(object({
    model      = string
    memory_gib = number
    count      = number
  }))
  default = []

  validation {
    condition     = alltrue([for gpu in var.static_gpus : length(gpu.model) > 0 && gpu.memory_gib > 0 && gpu.memory_gib <= 1024 && gpu.count >= 1 && gpu.count <= 64 && floor(gpu.count) == gpu.count])
    error_message = "Every static_gpus entry needs a model, memory_gib in (0, 1024] and a whole count in 1..64."
  }
}

variable "reconnect_initial_backoff_s" {
  description = "First delay (seconds) before the agent dials the scheduler again after a disconnect."
  type        = number
  default     = 0.5

  validation {
    condition     = var.reconnect_initial_backoff_s > 0 && var.reconnect_initial_backoff_s <= 60
    error_message = "The reconnect_initial_backoff_s must be in (0, 60]."
  }
}

variable "reconnect_max_backoff_s" {
  description = "Longest delay (seconds) between attempts to reach the scheduler."
  type        = number
  default     = 30

  validation {
    condition     = var.reconnect_max_backoff_s > 0 && var.reconnect_max_backoff_s <= 600
    error_message = "The reconnect_max_backoff_s must be in (0, 600]."
  }
}

variable "wheel_url" {
  description = "HTTPS URL of a spillway wheel to install. Empty: install spillway[agent] from package_index_url."
  type        = string
  default     = ""

  validation {
    condition     = var.wheel_url == "" || can(regex("^https://[^ ]+\\.whl$", var.wheel_url))
    error_message = "The wheel_url must be empty or an https:// URL of a .whl file."
  }
}

variable "package_index_url" {
  description = "HTTPS URL of the package index (PEP 503) to install from, e.g. a private mirror. Empty: pip's default (PyPI)."
  type        = string
  default     = ""

  validation {
    condition     = var.package_index_url == "" || can(regex("^https://[^ ]+$", var.package_index_url))
    error_message = "The package_index_url must be empty or an https:// URL."
  }
}

variable "package_version" {
  description = "Version of spillway to install from the index (e.g. \"0.1.0\"). Empty: the newest. Ignored with wheel_url."
  type        = string
  default     = ""

  validation {
    condition     = var.package_version == "" || can(regex("^[0-9][0-9A-Za-z.+!-]*$", var.package_version))
    error_message = "The package_version must be empty or a version such as \"0.1.0\"."
  }
}

variable "install_sglang" {
  description = "Install SGLang (spillway's sglang extra) when the machine's image lacks it: the agent's venv then sees the system's packages, and pip runs only when it cannot find the sglang module."
  type        = bool
  default     = false
}

variable "system_packages" {
  description = "OS packages cloud-init installs first. The default suits Debian and Ubuntu images; use [] on Amazon Linux and RHEL, whose python3 has venv built in."
  type        = list(string)
  default     = ["python3-venv"]
}
