variable "name" {
  description = "Name of the group: prefix of every resource and of every agent id (each machine appends its instance id)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$", var.name))
    error_message = "The name must be 1-32 lower case letters, digits or '-', e.g. \"spillway-eu\"."
  }
}

variable "region" {
  description = "AWS region of the provider this module runs with (e.g. \"eu-central-1\"). Must be one of allowed_regions."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "The region must be an AWS region name, e.g. \"eu-central-1\"."
  }
}

variable "allowed_regions" {
  description = "Regions this deployment may run in (its residency lock). Planning fails when region is not one of them."
  type        = list(string)

  validation {
    condition     = length(var.allowed_regions) > 0
    error_message = "Set allowed_regions to the AWS regions these machines may run in, e.g. [\"eu-central-1\"]."
  }
}

variable "vpc_id" {
  description = "VPC the machines run in."
  type        = string

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "Set vpc_id to the id of your VPC, e.g. \"vpc-0123456789abcdef0\"."
  }
}

variable "subnet_ids" {
  description = "Private subnets (of vpc_id) the group launches into. Machines get no public IP; the subnets need a route out (NAT or endpoints) to the scheduler, the package index and AWS APIs."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "Set subnet_ids to at least one private subnet of vpc_id, e.g. [\"subnet-0123456789abcdef0\"]."
  }
}

variable "ami_id" {
  description = "AMI with the NVIDIA driver, python3 and cloud-init (e.g. an AWS Deep Learning Base GPU AMI)."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]+$", var.ami_id))
    error_message = "Set ami_id to an AMI id, e.g. \"ami-0123456789abcdef0\"."
  }
}

variable "instance_type" {
  description = "GPU instance type, e.g. \"p5.48xlarge\"."
  type        = string
}

variable "capacity_reservation_id" {
  description = "On-Demand Capacity Reservation to launch into (\"cr-...\"). Empty: launch into any open reservation, else on demand."
  type        = string
  default     = ""

  validation {
    condition     = var.capacity_reservation_id == "" || can(regex("^cr-[0-9a-f]+$", var.capacity_reservation_id))
    error_message = "The capacity_reservation_id must be empty or a reservation id, e.g. \"cr-0123456789abcdef0\"."
  }
}

variable "desired_capacity" {
  description = "Number of machines to run."
  type        = number
  default     = 1
}

variable "max_size" {
  description = "Largest size of the group."
  type        = number
  default     = 1
}

variable "root_volume_size_gb" {
  description = "Size of the encrypted root volume (model weights are cached there)."
  type        = number
  default     = 500
}

variable "ebs_kms_key_arn" {
  description = "KMS key for the root volume. Empty: the account's default EBS key."
  type        = string
  default     = ""
}

variable "token_secret_arn" {
  description = "ARN of the Secrets Manager secret holding the agent token (SecretString). Machines read it at boot; it never appears in user data."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.token_secret_arn))
    error_message = "Set token_secret_arn to the ARN of the Secrets Manager secret that holds the agent token, e.g. \"arn:aws:secretsmanager:eu-central-1:123456789012:secret:spillway-agent\"."
  }
}

variable "token_secret_kms_key_arn" {
  description = "Customer managed KMS key that encrypts the token secret, if any: the machines may decrypt with it through Secrets Manager only."
  type        = string
  default     = ""
}

variable "weights_bucket" {
  description = "Name of the S3 bucket holding model weights; the machines may list it and read its objects, nothing else."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.weights_bucket))
    error_message = "Set weights_bucket to the name of the S3 bucket that holds the model weights."
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

variable "temporal_client_cert_secret_arn" {
  description = "ARN of the Secrets Manager secret holding the node worker's client certificate for mutual TLS to Temporal (PEM; with the key); fetched at boot like the token, never in user data, and the machines may read it. Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_client_cert_secret_arn == "" || can(regex("^arn:[a-z-]+:secretsmanager:", var.temporal_client_cert_secret_arn))
    error_message = "The temporal_client_cert_secret_arn must be empty or a Secrets Manager secret ARN."
  }
}

variable "temporal_client_key_secret_arn" {
  description = "ARN of the Secrets Manager secret holding the node worker's client private key for mutual TLS to Temporal (PEM; with the certificate); fetched at boot like the token, never in user data, and the machines may read it. Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_client_key_secret_arn == "" || can(regex("^arn:[a-z-]+:secretsmanager:", var.temporal_client_key_secret_arn))
    error_message = "The temporal_client_key_secret_arn must be empty or a Secrets Manager secret ARN."
  }
}

variable "temporal_api_key_secret_arn" {
  description = "ARN of the Secrets Manager secret holding the node worker's Temporal API key (Temporal Cloud); fetched at boot like the token, never in user data, and the machines may read it. Empty: none."
  type        = string
  default     = ""

  validation {
    condition     = var.temporal_api_key_secret_arn == "" || can(regex("^arn:[a-z-]+:secretsmanager:", var.temporal_api_key_secret_arn))
    error_message = "The temporal_api_key_secret_arn must be empty or a Secrets Manager secret ARN."
  }
}

variable "install_sglang" {
  description = "Install SGLang (spillway's sglang extra) on machines whose image lacks it; pip runs only when the agent's venv cannot find the sglang module."
  type        = bool
  default     = false
}

variable "control_plane_cidr_blocks" {
  description = "Where the scheduler and Temporal listen: the machines may open connections to their ports there."
  type        = list(string)

  validation {
    condition     = length(var.control_plane_cidr_blocks) > 0
    error_message = "Set control_plane_cidr_blocks to the networks of the scheduler and Temporal, e.g. [\"10.0.0.0/16\"]."
  }
}

variable "serving_cidr_blocks" {
  description = "Private networks allowed to reach the replicas' ports (30000-30999), e.g. your router's subnet. Never the internet."
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
  description = "OS packages cloud-init installs first; [] on Amazon Linux."
  type        = list(string)
  default     = ["python3-venv"]
}

variable "tags" {
  description = "Tags for every resource and launched machine."
  type        = map(string)
  default     = {}
}

variable "root_device_name" {
  description = "Root device name of the AMI (\"/dev/sda1\" on Ubuntu based AMIs, \"/dev/xvda\" on Amazon Linux)."
  type        = string
  default     = "/dev/sda1"
}
