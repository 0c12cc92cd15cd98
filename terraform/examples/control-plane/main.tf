# Two control-plane machines, active-active: each runs a scheduler and a gateway. Every
# scheduler sees every agent (agents report to both), both host a control-plane worker on the
# same Temporal task queue, and each gateway watches one scheduler's fleet at a time and fails
# over to the other. Temporal here is a self-hosted cluster behind mutual TLS; for Temporal
# Cloud set temporal_address to its regional endpoint (REGION.CLOUD.api.temporal.io:7233) and
# temporal_api_key_source instead of the client certificate and key. Pass each user_data to
# the VM of your cloud.
terraform {
  required_version = ">= 1.0.0"
}

locals {
  machines   = ["cp-eu-1", "cp-eu-2"]
  schedulers = [for name in local.machines : "${name}.spillway.internal:50051"]
  secret     = "arn:aws:secretsmanager:eu-central-1:123456789012:secret"
}

module "control_plane" {
  source   = "../../modules/control-plane"
  for_each = toset(local.machines)

  name                = each.key
  policy              = file("${path.module}/policy.yaml")
  scheduler_addresses = local.schedulers
  clouds = {
    aws = {
      image   = "ami-0123456789abcdef0"
      regions = ["eu-central-1"]
      subnets = { "eu-central-1a" = "subnet-0123456789abcdef0" }
    }
  }

  # One tokens file for both schedulers: an agent's token works against either.
  tokens_source = {
    kind = "aws-secretsmanager"
    ref  = "${local.secret}:spillway-tokens"
  }
  # NAME=value lines: the cloud credentials the policy names by env.
  scheduler_environment_source = {
    kind = "aws-secretsmanager"
    ref  = "${local.secret}:spillway-scheduler-env"
  }
  scheduler_tls_cert_source = {
    kind = "aws-secretsmanager"
    ref  = "${local.secret}:spillway-scheduler-cert"
  }
  scheduler_tls_key_source = {
    kind = "aws-secretsmanager"
    ref  = "${local.secret}:spillway-scheduler-key"
  }
  scheduler_ca_pem      = file("${path.module}/spillway-ca.pem")
  scheduler_server_name = "scheduler.spillway.internal"

  temporal_address     = "temporal.spillway.internal:7233"
  temporal_namespace   = "spillway"
  temporal_ca_pem      = file("${path.module}/temporal-ca.pem")
  temporal_server_name = "frontend.temporal.internal"
  temporal_client_cert_source = {
    kind = "aws-secretsmanager"
    ref  = "${local.secret}:spillway-temporal-cert"
  }
  temporal_client_key_source = {
    kind = "aws-secretsmanager"
    ref  = "${local.secret}:spillway-temporal-key"
  }

  # Each gateway has its own token (spillway token new --role gateway --id cp-eu-N).
  gateway_token_source = {
    kind = "aws-secretsmanager"
    ref  = "${local.secret}:spillway-gateway-${each.key}"
  }
  package_version = "0.1.0"
}

# The agents of the reserved pool report to both schedulers.
module "agents" {
  source = "../../modules/agent-bootstrap"

  agent_id            = "gpu-eu"
  cloud               = "onprem"
  pool                = "reserved-eu"
  region              = "eu-frankfurt"
  allowed_regions     = ["eu-frankfurt"]
  residency_group     = "eu"
  scheduler_addresses = local.schedulers
  scheduler_ca_pem    = file("${path.module}/spillway-ca.pem")
  temporal_address    = "temporal.spillway.internal:7233"
  temporal_namespace  = "spillway"
  temporal_ca_pem     = file("${path.module}/temporal-ca.pem")
  token_source = {
    kind = "file"
    ref  = "/etc/spillway/agent.token"
  }
  temporal_client_cert_source = {
    kind = "file"
    ref  = "/etc/spillway/temporal/client.pem"
  }
  temporal_client_key_source = {
    kind = "file"
    ref  = "/etc/spillway/temporal/client.key"
  }
  scheduler_server_name = "scheduler.spillway.internal"
  temporal_server_name  = "frontend.temporal.internal"
}

output "control_plane_user_data" {
  value = { for name, machine in module.control_plane : name => machine.user_data }
}

output "agent_user_data" {
  value = module.agents.user_data
}
