variable "name" {
  description = "Name of the group: prefix of every resource and of every agent id (each machine appends its instance name)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$", var.name))
    error_message = "The name must be 1-32 lower case letters, digits or '-', e.g. \"spillway-eu\"."
  }
}

variable "resource_group_name" {
  description = "Resource group the scale set, its identity and its network security group are created in."
  type        = string

  validation {
    condition     = length(var.resource_group_name) > 0
    error_message = "Set resource_group_name to an existing resource group."
  }
}

variable "location" {
  description = "Azure region of the scale set (e.g. \"westeurope\"). Must be one of allowed_regions."
  type        = string

  validation {
    condition     = can(regex("^[a-z]+[a-z0-9]*$", var.location))
    error_message = "The location must be an Azure region name, e.g. \"westeurope\"."
  }
}

variable "allowed_regions" {
  description = "Regions this deployment may run in (its residency lock). Planning fails when location is not one of them."
  type        = list(string)

  validation {
    condition     = length(var.allowed_regions) > 0
    error_message = "Set allowed_regions to the Azure regions these machines may run in, e.g. [\"westeurope\"]."
  }
}

variable "zones" {
  description = "Availability zones to spread machines over. Empty: no zone pinning."
  type        = list(string)
  default     = []
}

variable "subnet_id" {
  description = "Resource id of the private subnet the machines attach to (no public address; needs a NAT gateway or firewall to reach out)."
  type        = string

  validation {
    condition     = can(regex("^/subscriptions/.+/subnets/.+$", var.subnet_id))
    error_message = "Set subnet_id to the resource id of a subnet, e.g. \"/subscriptions/S/resourceGroups/G/providers/Microsoft.Network/virtualNetworks/V/subnets/gpu\"."
  }
}

variable "sku" {
  description = "GPU VM size, e.g. \"Standard_ND96isr_H100_v5\"."
  type        = string
}

variable "instances" {
  description = "Number of machines to run."
  type        = number
  default     = 1
}

variable "capacity_reservation_group_id" {
  description = "Capacity reservation group to launch into. Empty: on demand."
  type        = string
  default     = ""
}

variable "source_image" {
  description = "Marketplace image with the NVIDIA driver, python3 and cloud-init."
  type = object({
    publisher = string
    offer     = string
    sku       = string
    version   = string
  })
  default = {
    publisher = "microsoft-dsvm"
    offer     = "ubuntu-hpc"
    sku       = "2204"
    version   = "latest"
  }
}

variable "admin_username" {
  description = "Administrator account for break-glass SSH access (key only, no password)."
  type        = string
  default     = "azureuser"
}

variable "admin_ssh_public_key" {
  description = "SSH public key of the administrator account."
  type        = string

  validation {
    condition     = can(regex("^(ssh-rsa|ssh-ed25519|ecdsa-sha2-nistp256) ", var.admin_ssh_public_key))
    error_message = "Set admin_ssh_public_key to an OpenSSH public key (ssh-rsa, ssh-ed25519 or ecdsa-sha2-nistp256)."
  }
}

variable "os_disk_size_gb" {
  description = "Size of the OS disk (model weights are cached there)."
  type        = number
  default     = 512
}

variable "disk_encryption_set_id" {
  description = "Disk encryption set (customer managed key) for the OS disk. Empty: platform-managed keys."
  type        = string
  default     = ""
}

variable "encryption_at_host_enabled" {
  description = "Encrypt temp disks and caches on the host (the subscription must have the EncryptionAtHost feature)."
  type        = bool
  default     = true
}

variable "key_vault_id" {
  description = "Resource id of the Key Vault (RBAC authorization) holding the agent token secret."
  type        = string

  validation {
    condition     = can(regex("^/subscriptions/.+/providers/Microsoft.KeyVault/vaults/[A-Za-z0-9-]+$", var.key_vault_id))
    error_message = "Set key_vault_id to the resource id of the Key Vault that holds the agent token."
  }
}

variable "token_secret_name" {
  description = "Name of the Key Vault secret holding the agent token. Machines read it at boot; it never appears in custom data."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9-]{1,127}$", var.token_secret_name))
    error_message = "Set token_secret_name to the name of the Key Vault secret that holds the agent token."
  }
}

variable "weights_storage_account_id" {
  description = "Resource id of the storage account holding model weights."
  type        = string

  validation {
    condition     = can(regex("^/subscriptions/.+/providers/Microsoft.Storage/storageAccounts/[a-z0-9]+$", var.weights_storage_account_id))
    error_message = "Set weights_storage_account_id to the resource id of the storage account that holds the model weights."
  }
}

variable "weights_container_name" {
  description = "Blob container holding model weights; the machines may read its blobs, nothing else."
  type        = string

  validation {
    condition     = length(var.weights_container_name) >= 3
    error_message = "Set weights_container_name to the blob container that holds the model weights."
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

variable "temporal_client_cert_secret_name" {
  description = "Name of the secret in key_vault_id holding the node worker's client certificate for mutual TLS to Temporal (PEM; with the key); fetched at boot like the token, never in user data, and the machines may read it. Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_client_cert_secret_name == "" || can(regex("^[0-9A-Za-z-]{1,127}$", var.temporal_client_cert_secret_name))
    error_message = "The temporal_client_cert_secret_name must be empty or a Key Vault secret name."
  }
}

variable "temporal_client_key_secret_name" {
  description = "Name of the secret in key_vault_id holding the node worker's client private key for mutual TLS to Temporal (PEM; with the certificate); fetched at boot like the token, never in user data, and the machines may read it. Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_client_key_secret_name == "" || can(regex("^[0-9A-Za-z-]{1,127}$", var.temporal_client_key_secret_name))
    error_message = "The temporal_client_key_secret_name must be empty or a Key Vault secret name."
  }
}

variable "temporal_api_key_secret_name" {
  description = "Name of the secret in key_vault_id holding the node worker's Temporal API key (Temporal Cloud); fetched at boot like the token, never in user data, and the machines may read it. Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_api_key_secret_name == "" || can(regex("^[0-9A-Za-z-]{1,127}$", var.temporal_api_key_secret_name))
    error_message = "The temporal_api_key_secret_name must be empty or a Key Vault secret name."
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
    condition     = !contains(var.serving_cidr_blocks, "0.0.0.0/0") && !contains(var.serving_cidr_blocks, "::/0") && !contains(var.serving_cidr_blocks, "*") && !contains(var.serving_cidr_blocks, "Internet")
    error_message = "The serving_cidr_blocks must not contain 0.0.0.0/0, ::/0, * or Internet: replicas are never open to the internet."
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

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
