# Renders the cloud-init user data that installs and starts the Spillway agent. No providers and
# no resources: everything here is a pure function of the variables, so the same inputs give
# byte-for-byte the user data that providers/bootstrap.py renders for machines the control
# plane launches (both read templates/cloud-init.yaml.tftpl and templates/spillway-boot.py).

locals {
  # Paths on the machine. The token and the completed agent config live in /run (tmpfs),
  # written by spillway-boot before every start of the agent.
  token_file = "/run/spillway/token"
  ca_file    = "/run/spillway/scheduler-ca.pem"
  state_dir  = "/var/lib/spillway/state"

  # address for one scheduler, addresses for several: the other key is left out.
  scheduler_target = {
    for key, value in { address = var.scheduler_address, addresses = var.scheduler_addresses } :
    key => value if length(value) > 0
  }

  agent_config = {
    agent_id = var.agent_id
    scheduler = merge(local.scheduler_target, {
      token_file = local.token_file
      tls = var.scheduler_ca_pem == "" ? null : {
        ca_file     = local.ca_file
        server_name = var.scheduler_server_name == "" ? null : var.scheduler_server_name
      }
    })
    labels = {
      pool            = var.pool
      provider        = var.cloud
      region          = var.region
      zone            = var.zone
      residency_group = var.residency_group
      instance_id     = ""
      extra           = var.extra_labels
    }
    gpus = {
      discovery = var.gpu_discovery
      static    = var.static_gpus
    }
    reconnect = {
      initial_backoff_s = var.reconnect_initial_backoff_s
      max_backoff_s     = var.reconnect_max_backoff_s
    }
    # The unit's StateDirectory: the only place the agent may write (ProtectSystem=strict).
    state_dir = local.state_dir
    temporal = var.temporal_address == "" ? null : {
      address   = var.temporal_address
      namespace = var.temporal_namespace
    }
  }

  # Read by spillway-boot on the machine. References to the secrets, never the secrets.
  bootstrap_settings = {
    append_instance_id = var.append_instance_id
    identity_client_id = var.identity_client_id
    package = {
      wheel_url = var.wheel_url
      index_url = var.package_index_url
      version   = var.package_version
    }
    install_sglang   = var.install_sglang
    scheduler_ca_pem = var.scheduler_ca_pem
    # The Temporal client's certificate, key and API key: references, never the values.
    temporal_api_key_source     = var.temporal_api_key_source
    temporal_ca_pem             = var.temporal_ca_pem
    temporal_client_cert_source = var.temporal_client_cert_source
    temporal_client_key_source  = var.temporal_client_key_source
    temporal_server_name        = var.temporal_server_name
    temporal_tls                = var.temporal_tls
    token_source = {
      kind = var.token_source.kind
      ref  = var.token_source.ref
    }
  }

  # Validation blocks in Terraform 1.0 can only see their own variable; these checks span two.
  # A failed check stops the plan with its message (tobool refuses any string but true/false).
  problems = compact([
    contains(var.allowed_regions, var.region) ? "" : "region ${var.region} is not in allowed_regions [${join(", ", var.allowed_regions)}]: set region to one of them or extend allowed_regions",
    var.gpu_discovery != "static" || length(var.static_gpus) > 0 ? "" : "gpu_discovery is static: set static_gpus to the GPUs of these machines",
    var.reconnect_max_backoff_s >= var.reconnect_initial_backoff_s ? "" : "reconnect_max_backoff_s must be at least reconnect_initial_backoff_s",
    var.wheel_url == "" || var.package_version == "" ? "" : "set either wheel_url or package_version, not both",
    (var.scheduler_address == "") != (length(var.scheduler_addresses) == 0) ? "" : "set scheduler_address (one scheduler) or scheduler_addresses (several), exactly one of them",
    (var.temporal_client_cert_source == null) == (var.temporal_client_key_source == null) ? "" : "set temporal_client_cert_source and temporal_client_key_source together (mutual TLS needs both)",
    var.temporal_address != "" || !local.temporal_extras ? "" : "the temporal_* connection settings need temporal_address: set it to the Temporal frontend's host:port",
  ])
  temporal_extras = anytrue([
    var.temporal_server_name != "",
    var.temporal_ca_pem != "",
    var.temporal_tls,
    var.temporal_client_cert_source != null,
    var.temporal_client_key_source != null,
    var.temporal_api_key_source != null,
  ])
  checked = length(local.problems) == 0 ? true : tobool(join("; ", local.problems))

  user_data = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    install_packages   = length(var.system_packages) > 0
    agent_config       = jsonencode(local.agent_config)
    bootstrap_settings = jsonencode(local.bootstrap_settings)
    boot_script        = filebase64("${path.module}/templates/spillway-boot.py")
    system_packages    = jsonencode(var.system_packages)
  })
}
