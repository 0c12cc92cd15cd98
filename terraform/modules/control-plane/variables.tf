variable "name" {
  description = "Name of this control-plane machine: the gateway's gateway_id and the scheduler's Temporal identity (lower case letters, digits, '.', '_', '-'; at most 63)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$", var.name))
    error_message = "The name must be 1-63 lower case letters, digits, '.', '_' or '-', starting and ending with a letter or digit, e.g. \"cp-eu-1\"."
  }
}

variable "policy" {
  description = "The policy file's content (YAML: deployments, pools, clouds, residency), written to /etc/spillway/policy.yaml for the scheduler and the gateway. It must not contain secrets: it names environment variables and files instead."
  type        = string

  validation {
    condition     = can(keys(yamldecode(var.policy)))
    error_message = "The policy must be a YAML mapping (the policy file's content, e.g. file(\"policy.yaml\"))."
  }
}

variable "scheduler_listen" {
  description = "gRPC listen address of the scheduler (agents and gateways dial it)."
  type        = string
  default     = "0.0.0.0:50051"

  validation {
    condition     = can(regex("^(\\[[0-9a-fA-F:]+\\]|[A-Za-z0-9.-]*):[0-9]{1,5}$", var.scheduler_listen))
    error_message = "The scheduler_listen must be host:port, e.g. \"0.0.0.0:50051\"."
  }
}

variable "scheduler_metrics_listen" {
  description = "Prometheus /metrics address of the scheduler (host:port). Empty: no metrics endpoint."
  type        = string
  default     = "0.0.0.0:9464"

  validation {
    condition     = var.scheduler_metrics_listen == "" || can(regex("^(\\[[0-9a-fA-F:]+\\]|[A-Za-z0-9.-]*):[0-9]{1,5}$", var.scheduler_metrics_listen))
    error_message = "The scheduler_metrics_listen must be empty or host:port, e.g. \"0.0.0.0:9464\"."
  }
}

variable "report_interval_s" {
  description = "How often agents and gateways report to the scheduler, in seconds (also the decision tick)."
  type        = number
  default     = 5

  validation {
    condition     = var.report_interval_s > 0 && var.report_interval_s <= 3600
    error_message = "The report_interval_s must be in (0, 3600]."
  }
}

variable "tokens_source" {
  description = "Where the scheduler's tokens file (hashed bearer tokens, YAML, from spillway token new) lives, read in place when kind is \"file\" (edits take effect within tokens_reload_every_s; the file must be readable by the spillway-scheduler user), else fetched at every start to the unit's /run directory (mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME)."
  type = object({
    kind = string
    ref  = string
  })

  validation {
    condition     = contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.tokens_source.kind)
    error_message = "The tokens_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = length(trimspace(var.tokens_source.ref)) > 0 && (var.tokens_source.kind != "file" || substr(var.tokens_source.ref, 0, 1) == "/")
    error_message = "Set tokens_source.ref to where the scheduler's tokens file (hashed bearer tokens, YAML, from spillway token new) lives: an absolute file path (e.g. \"/etc/spillway/tokens.yaml\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "scheduler_environment_source" {
  description = "Where an environment file for the scheduler (NAME=value lines: cloud credentials the policy names by env, or the variable a temporal api_key_env would name) lives, fetched at every start (to the unit's /run directory, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
  type = object({
    kind = string
    ref  = string
  })
  default = null

  validation {
    condition     = var.scheduler_environment_source == null ? true : contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.scheduler_environment_source.kind)
    error_message = "The scheduler_environment_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = var.scheduler_environment_source == null ? true : length(trimspace(var.scheduler_environment_source.ref)) > 0 && (var.scheduler_environment_source.kind != "file" || substr(var.scheduler_environment_source.ref, 0, 1) == "/")
    error_message = "Set scheduler_environment_source.ref to where an environment file for the scheduler (NAME=value lines: cloud credentials the policy names by env, or the variable a temporal api_key_env would name) lives: an absolute file path (e.g. \"/etc/spillway/scheduler.env\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "scheduler_tls_cert_source" {
  description = "Where the scheduler's TLS certificate chain (PEM; with scheduler_tls_key_source) lives, fetched at every start (to the unit's /run directory, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
  type = object({
    kind = string
    ref  = string
  })
  default = null

  validation {
    condition     = var.scheduler_tls_cert_source == null ? true : contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.scheduler_tls_cert_source.kind)
    error_message = "The scheduler_tls_cert_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = var.scheduler_tls_cert_source == null ? true : length(trimspace(var.scheduler_tls_cert_source.ref)) > 0 && (var.scheduler_tls_cert_source.kind != "file" || substr(var.scheduler_tls_cert_source.ref, 0, 1) == "/")
    error_message = "Set scheduler_tls_cert_source.ref to where the scheduler's TLS certificate chain (PEM; with scheduler_tls_key_source) lives: an absolute file path (e.g. \"/etc/spillway/scheduler.pem\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "scheduler_tls_key_source" {
  description = "Where the scheduler's TLS private key (PEM; with scheduler_tls_cert_source) lives, fetched at every start (to the unit's /run directory, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
  type = object({
    kind = string
    ref  = string
  })
  default = null

  validation {
    condition     = var.scheduler_tls_key_source == null ? true : contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.scheduler_tls_key_source.kind)
    error_message = "The scheduler_tls_key_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = var.scheduler_tls_key_source == null ? true : length(trimspace(var.scheduler_tls_key_source.ref)) > 0 && (var.scheduler_tls_key_source.kind != "file" || substr(var.scheduler_tls_key_source.ref, 0, 1) == "/")
    error_message = "Set scheduler_tls_key_source.ref to where the scheduler's TLS private key (PEM; with scheduler_tls_cert_source) lives: an absolute file path (e.g. \"/etc/spillway/scheduler.key\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "scheduler_client_ca_pem" {
  description = "PEM of the CA that signs agents' and gateways' client certificates: every client must then present one (mutual TLS; needs the scheduler's TLS) (public, not a secret). Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.scheduler_client_ca_pem == "" || length(regexall("-----BEGIN CERTIFICATE-----", var.scheduler_client_ca_pem)) > 0
    error_message = "The scheduler_client_ca_pem must be empty or a PEM certificate (-----BEGIN CERTIFICATE-----)."
  }
}

variable "scheduler_ca_pem" {
  description = "PEM of the CA that signed the schedulers' certificates, which this machine's gateway checks (needed when the schedulers use TLS) (public, not a secret). Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.scheduler_ca_pem == "" || length(regexall("-----BEGIN CERTIFICATE-----", var.scheduler_ca_pem)) > 0
    error_message = "The scheduler_ca_pem must be empty or a PEM certificate (-----BEGIN CERTIFICATE-----)."
  }
}

variable "scheduler_server_name" {
  description = "Name the gateway checks the schedulers' certificates against, when it differs from the hosts in scheduler_addresses."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^[A-Za-z0-9.-]{0,253}$", var.scheduler_server_name))
    error_message = "The scheduler_server_name must be empty or a DNS name, e.g. \"scheduler.spillway.internal\"."
  }
}

variable "scheduler_addresses" {
  description = "host:port of every scheduler (this machine's included), as the gateway dials them: it reports to each and watches the fleet of one at a time, failing over to the next."
  type        = list(string)

  validation {
    condition     = length(var.scheduler_addresses) > 0 && length(distinct(var.scheduler_addresses)) == length(var.scheduler_addresses) && alltrue([for address in var.scheduler_addresses : can(regex("^(\\[[0-9a-fA-F:]+\\]|[A-Za-z0-9.-]+):[0-9]{1,5}$", address))])
    error_message = "Set scheduler_addresses to the host:port of every scheduler, each once, e.g. [\"cp-1.internal:50051\", \"cp-2.internal:50051\"]."
  }
}

variable "clouds" {
  description = "The scheduler config's clouds section: per cloud (aws, gcp, azure) the image machines boot and where they go (see scheduler/config.py). Credentials come from the machine's identity, never from here."
  type        = any
  default     = {}
}

variable "spill" {
  description = "The scheduler config's spill section (decision pacing and timeouts; see scheduler/config.py). Empty: the defaults."
  type        = any
  default     = {}
}

variable "temporal_address" {
  description = "host:port of the Temporal frontend the scheduler's workflows run on (a self-hosted cluster, or the regional endpoint REGION.CLOUD.api.temporal.io:7233)."
  type        = string

  validation {
    condition     = can(regex("^(\\[[0-9a-fA-F:]+\\]|[A-Za-z0-9.-]+):[0-9]{1,5}$", var.temporal_address))
    error_message = "The temporal_address must be host:port, e.g. \"temporal.internal:7233\"."
  }
}

variable "temporal_namespace" {
  description = "Temporal namespace of the control plane."
  type        = string
  default     = "default"

  validation {
    condition     = length(var.temporal_namespace) > 0 && length(var.temporal_namespace) <= 255
    error_message = "The temporal_namespace must be 1-255 characters."
  }
}

variable "temporal_task_queue" {
  description = "Task queue of the control-plane worker; every scheduler of one Spillway uses the same."
  type        = string
  default     = "spillway-control"

  validation {
    condition     = length(var.temporal_task_queue) > 0
    error_message = "The temporal_task_queue must not be empty."
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
  description = "PEM of the CA that signed the Temporal frontend's certificate (turns on TLS; empty: the system roots when TLS is on) (public, not a secret). Empty: none."
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
  description = "Where the scheduler's client certificate for mutual TLS to Temporal (PEM; with temporal_client_key_source) lives, fetched at every start (to the unit's /run directory, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
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
    error_message = "Set temporal_client_cert_source.ref to where the scheduler's client certificate for mutual TLS to Temporal (PEM; with temporal_client_key_source) lives: an absolute file path (e.g. \"/etc/spillway/temporal/client.pem\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "temporal_client_key_source" {
  description = "Where the scheduler's client private key for mutual TLS to Temporal (PEM; with temporal_client_cert_source) lives, fetched at every start (to the unit's /run directory, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
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
    error_message = "Set temporal_client_key_source.ref to where the scheduler's client private key for mutual TLS to Temporal (PEM; with temporal_client_cert_source) lives: an absolute file path (e.g. \"/etc/spillway/temporal/client.key\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "temporal_api_key_source" {
  description = "Where the scheduler's Temporal API key (Temporal Cloud; one word) lives, fetched at every start (to the unit's /run directory, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
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
    error_message = "Set temporal_api_key_source.ref to where the scheduler's Temporal API key (Temporal Cloud; one word) lives: an absolute file path (e.g. \"/etc/spillway/temporal/api-key\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "gateway_listen" {
  description = "HTTP listen address of the gateway (the OpenAI-compatible endpoint and its /metrics)."
  type        = string
  default     = "0.0.0.0:8000"

  validation {
    condition     = can(regex("^(\\[[0-9a-fA-F:]+\\]|[A-Za-z0-9.-]*):[0-9]{1,5}$", var.gateway_listen))
    error_message = "The gateway_listen must be host:port, e.g. \"0.0.0.0:8000\"."
  }
}

variable "gateway_token_source" {
  description = "Where the gateway's bearer token (one word; spillway token new --role gateway --id NAME) lives, fetched at every start (to the unit's /run directory, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME)."
  type = object({
    kind = string
    ref  = string
  })

  validation {
    condition     = contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.gateway_token_source.kind)
    error_message = "The gateway_token_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = length(trimspace(var.gateway_token_source.ref)) > 0 && (var.gateway_token_source.kind != "file" || substr(var.gateway_token_source.ref, 0, 1) == "/")
    error_message = "Set gateway_token_source.ref to where the gateway's bearer token (one word; spillway token new --role gateway --id NAME) lives: an absolute file path (e.g. \"/etc/spillway/gateway.token\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "gateway_tls_cert_source" {
  description = "Where the gateway's client certificate towards the schedulers (PEM; needed when they require mutual TLS) lives, fetched at every start (to the unit's /run directory, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
  type = object({
    kind = string
    ref  = string
  })
  default = null

  validation {
    condition     = var.gateway_tls_cert_source == null ? true : contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.gateway_tls_cert_source.kind)
    error_message = "The gateway_tls_cert_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = var.gateway_tls_cert_source == null ? true : length(trimspace(var.gateway_tls_cert_source.ref)) > 0 && (var.gateway_tls_cert_source.kind != "file" || substr(var.gateway_tls_cert_source.ref, 0, 1) == "/")
    error_message = "Set gateway_tls_cert_source.ref to where the gateway's client certificate towards the schedulers (PEM; needed when they require mutual TLS) lives: an absolute file path (e.g. \"/etc/spillway/gateway.pem\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "gateway_tls_key_source" {
  description = "Where the gateway's client private key towards the schedulers (PEM; with gateway_tls_cert_source) lives, fetched at every start (to the unit's /run directory, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
  type = object({
    kind = string
    ref  = string
  })
  default = null

  validation {
    condition     = var.gateway_tls_key_source == null ? true : contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.gateway_tls_key_source.kind)
    error_message = "The gateway_tls_key_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = var.gateway_tls_key_source == null ? true : length(trimspace(var.gateway_tls_key_source.ref)) > 0 && (var.gateway_tls_key_source.kind != "file" || substr(var.gateway_tls_key_source.ref, 0, 1) == "/")
    error_message = "Set gateway_tls_key_source.ref to where the gateway's client private key towards the schedulers (PEM; with gateway_tls_cert_source) lives: an absolute file path (e.g. \"/etc/spillway/gateway.key\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "replica_api_key_source" {
  description = "Where the replicas' API key (SGLang's --api-key) that the gateway sends them (one word) lives, fetched at every start (to the unit's /run directory, mode 0400; never in user data): kind \"file\" (ref: absolute path on the machine), \"aws-secretsmanager\" (ref: secret ARN), \"gcp-secretmanager\" (ref: projects/P/secrets/S) or \"azure-keyvault\" (ref: https://VAULT.vault.azure.net/secrets/NAME). Null: none."
  type = object({
    kind = string
    ref  = string
  })
  default = null

  validation {
    condition     = var.replica_api_key_source == null ? true : contains(["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"], var.replica_api_key_source.kind)
    error_message = "The replica_api_key_source.kind must be \"file\", \"aws-secretsmanager\", \"gcp-secretmanager\" or \"azure-keyvault\"."
  }

  validation {
    condition     = var.replica_api_key_source == null ? true : length(trimspace(var.replica_api_key_source.ref)) > 0 && (var.replica_api_key_source.kind != "file" || substr(var.replica_api_key_source.ref, 0, 1) == "/")
    error_message = "Set replica_api_key_source.ref to where the replicas' API key (SGLang's --api-key) that the gateway sends them (one word) lives: an absolute file path (e.g. \"/etc/spillway/replica-api-key\"), a Secrets Manager ARN, projects/P/secrets/S, or https://VAULT.vault.azure.net/secrets/NAME."
  }
}

variable "identity_client_id" {
  description = "Azure only: client id of the user-assigned managed identity that may read the Key Vault secrets."
  type        = string
  default     = ""
}

variable "wheel_url" {
  description = "HTTPS URL of a spillway wheel to install. Empty: install spillway[scheduler,gateway] from package_index_url."
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

variable "system_packages" {
  description = "OS packages cloud-init installs first. The default suits Debian and Ubuntu images; use [] on Amazon Linux and RHEL, whose python3 has venv built in."
  type        = list(string)
  default     = ["python3-venv"]
}
