# Renders the cloud-init user data of a control-plane machine: the scheduler (with its Temporal
# worker) and the gateway, their configs, the policy file and two hardened systemd units. No
# providers and no resources: everything here is a pure function of the variables, so it plans
# and applies offline. Secrets are references: the units fetch them at every start into their
# own runtime directories (tmpfs) with spillway-boot, the agent bootstrap's helper.

locals {
  scheduler_run = "/run/spillway-scheduler"
  gateway_run   = "/run/spillway-gateway"
  policy_file   = "/etc/spillway/policy.yaml"

  scheduler_tls = var.scheduler_tls_cert_source != null
  temporal_tls = anytrue([
    var.temporal_tls,
    var.temporal_ca_pem != "",
    var.temporal_server_name != "",
    var.temporal_client_cert_source != null,
  ])
  # A tokens file on the machine is read in place, so that edits (a revoked token) take effect
  # without a restart; one in a cloud secret store is copied at every start.
  tokens_in_place = var.tokens_source.kind == "file"
  tokens_file     = local.tokens_in_place ? var.tokens_source.ref : "${local.scheduler_run}/tokens.yaml"

  scheduler_config = {
    listen            = var.scheduler_listen
    metrics_listen    = var.scheduler_metrics_listen == "" ? null : var.scheduler_metrics_listen
    tokens_file       = local.tokens_file
    report_interval_s = var.report_interval_s
    tls = local.scheduler_tls ? {
      cert_file      = "${local.scheduler_run}/tls.pem"
      key_file       = "${local.scheduler_run}/tls.key"
      client_ca_file = var.scheduler_client_ca_pem == "" ? null : "${local.scheduler_run}/client-ca.pem"
    } : null
    policy_file = local.policy_file
    temporal = {
      address    = var.temporal_address
      namespace  = var.temporal_namespace
      task_queue = var.temporal_task_queue
      identity   = var.name
      tls = local.temporal_tls ? {
        ca_file     = var.temporal_ca_pem == "" ? null : "${local.scheduler_run}/temporal-ca.pem"
        cert_file   = var.temporal_client_cert_source == null ? null : "${local.scheduler_run}/temporal-client.pem"
        key_file    = var.temporal_client_key_source == null ? null : "${local.scheduler_run}/temporal-client.key"
        server_name = var.temporal_server_name == "" ? null : var.temporal_server_name
      } : null
      api_key_file = var.temporal_api_key_source == null ? null : "${local.scheduler_run}/temporal-api-key"
    }
    clouds = var.clouds
    spill  = var.spill
  }

  gateway_config = {
    gateway_id  = var.name
    listen      = var.gateway_listen
    policy_file = local.policy_file
    scheduler = {
      addresses  = var.scheduler_addresses
      token_file = "${local.gateway_run}/token"
      tls = var.scheduler_ca_pem == "" ? null : {
        ca_file     = "${local.gateway_run}/scheduler-ca.pem"
        cert_file   = var.gateway_tls_cert_source == null ? null : "${local.gateway_run}/tls.pem"
        key_file    = var.gateway_tls_key_source == null ? null : "${local.gateway_run}/tls.key"
        server_name = var.scheduler_server_name == "" ? null : var.scheduler_server_name
      }
    }
    replica_api_key_file = var.replica_api_key_source == null ? null : "${local.gateway_run}/replica-api-key"
  }

  # What spillway-boot writes into each unit's runtime directory before every start: public
  # certificates inline (content), secrets as references (source), never a secret's value.
  # Each entry is JSON text, so that entries of different shapes can share one list.
  scheduler_files = concat(
    local.tokens_in_place ? [] : [jsonencode({ name = "tokens.yaml", field = "tokens_source", what = "the scheduler's tokens file", format = "text", source = var.tokens_source })],
    local.scheduler_tls ? [
      jsonencode({ name = "tls.pem", field = "scheduler_tls_cert_source", what = "the scheduler's TLS certificate", format = "pem", source = var.scheduler_tls_cert_source }),
      jsonencode({ name = "tls.key", field = "scheduler_tls_key_source", what = "the scheduler's TLS key", format = "pem", source = var.scheduler_tls_key_source }),
    ] : [],
    var.scheduler_client_ca_pem == "" ? [] : [jsonencode({ name = "client-ca.pem", content = var.scheduler_client_ca_pem })],
    var.temporal_ca_pem == "" ? [] : [jsonencode({ name = "temporal-ca.pem", content = var.temporal_ca_pem })],
    var.temporal_client_cert_source == null ? [] : [
      jsonencode({ name = "temporal-client.pem", field = "temporal_client_cert_source", what = "the Temporal client certificate", format = "pem", source = var.temporal_client_cert_source }),
      jsonencode({ name = "temporal-client.key", field = "temporal_client_key_source", what = "the Temporal client key", format = "pem", source = var.temporal_client_key_source }),
    ],
    var.scheduler_environment_source == null ? [] : [jsonencode({ name = "environment", field = "scheduler_environment_source", what = "the scheduler's environment file", format = "env", source = var.scheduler_environment_source })],
    var.temporal_api_key_source == null ? [] : [jsonencode({ name = "temporal-api-key", field = "temporal_api_key_source", what = "the Temporal API key", format = "word", source = var.temporal_api_key_source })],
  )
  gateway_files = concat(
    [jsonencode({ name = "token", field = "gateway_token_source", what = "the gateway token", format = "word", source = var.gateway_token_source })],
    var.scheduler_ca_pem == "" ? [] : [jsonencode({ name = "scheduler-ca.pem", content = var.scheduler_ca_pem })],
    var.gateway_tls_cert_source == null ? [] : [
      jsonencode({ name = "tls.pem", field = "gateway_tls_cert_source", what = "the gateway's client certificate", format = "pem", source = var.gateway_tls_cert_source }),
      jsonencode({ name = "tls.key", field = "gateway_tls_key_source", what = "the gateway's client key", format = "pem", source = var.gateway_tls_key_source }),
    ],
    var.replica_api_key_source == null ? [] : [jsonencode({ name = "replica-api-key", field = "replica_api_key_source", what = "the replicas' API key", format = "word", source = var.replica_api_key_source })],
  )

  bootstrap_settings = {
    extras             = "scheduler,gateway"
    identity_client_id = var.identity_client_id
    install_sglang     = false
    package = {
      wheel_url = var.wheel_url
      index_url = var.package_index_url
      version   = var.package_version
    }
    files = {
      scheduler = [for file in local.scheduler_files : jsondecode(file)]
      gateway   = [for file in local.gateway_files : jsondecode(file)]
    }
  }

  ports = [for address in compact([var.scheduler_listen, var.scheduler_metrics_listen, var.gateway_listen]) : regex(":([0-9]+)$", address)[0]]

  # Validation blocks in Terraform 1.0 can only see their own variable; these checks span two.
  # A failed check stops the plan with its message (tobool refuses any string but true/false).
  problems = compact([
    (var.scheduler_tls_cert_source == null) == (var.scheduler_tls_key_source == null) ? "" : "set scheduler_tls_cert_source and scheduler_tls_key_source together",
    var.scheduler_client_ca_pem == "" || local.scheduler_tls ? "" : "scheduler_client_ca_pem (mutual TLS) needs the scheduler's own TLS: set scheduler_tls_cert_source and scheduler_tls_key_source",
    !local.scheduler_tls || var.scheduler_ca_pem != "" ? "" : "the scheduler uses TLS: set scheduler_ca_pem to the CA that signed the schedulers' certificates, which the gateway checks",
    var.scheduler_client_ca_pem == "" || var.gateway_tls_cert_source != null ? "" : "the schedulers require client certificates (scheduler_client_ca_pem): set gateway_tls_cert_source and gateway_tls_key_source",
    (var.gateway_tls_cert_source == null) == (var.gateway_tls_key_source == null) ? "" : "set gateway_tls_cert_source and gateway_tls_key_source together",
    var.gateway_tls_cert_source == null || var.scheduler_ca_pem != "" ? "" : "gateway_tls_cert_source needs scheduler_ca_pem (TLS towards the schedulers)",
    (var.temporal_client_cert_source == null) == (var.temporal_client_key_source == null) ? "" : "set temporal_client_cert_source and temporal_client_key_source together (mutual TLS needs both)",
    var.wheel_url == "" || var.package_version == "" ? "" : "set either wheel_url or package_version, not both",
    length(distinct(local.ports)) == length(local.ports) ? "" : "scheduler_listen, scheduler_metrics_listen and gateway_listen need a port each",
    length(setsubtract(keys(var.clouds), ["aws", "gcp", "azure"])) == 0 ? "" : "clouds may only have the keys aws, gcp and azure",
  ])
  checked = length(local.problems) == 0 ? true : tobool(join("; ", local.problems))

  user_data = templatefile("${path.module}/templates/control-plane.yaml.tftpl", {
    install_packages   = length(var.system_packages) > 0
    system_packages    = jsonencode(var.system_packages)
    scheduler_config   = jsonencode(local.scheduler_config)
    gateway_config     = jsonencode(local.gateway_config)
    policy             = base64encode(var.policy)
    bootstrap_settings = jsonencode(local.bootstrap_settings)
    boot_script        = filebase64("${path.module}/../agent-bootstrap/templates/spillway-boot.py")
    scheduler_unit     = filebase64("${path.module}/templates/spillway-scheduler.service")
    gateway_unit       = filebase64("${path.module}/templates/spillway-gateway.service")
  })
}
