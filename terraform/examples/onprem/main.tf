# User data for a machine you install yourself (bare metal, another hypervisor): pass it to
# cloud-init as user data. The token file must be put on the machine by your own tooling.
terraform {
  required_version = ">= 1.0.0"
}

module "agent_bootstrap" {
  source = "../../modules/agent-bootstrap"

  agent_id          = "gpu-node-1"
  cloud             = "onprem"
  pool              = "reserved-eu"
  region            = "eu-frankfurt"
  allowed_regions   = ["eu-frankfurt"]
  residency_group   = "eu"
  scheduler_address = "scheduler.spillway.internal:50051"
  temporal_address  = "temporal.spillway.internal:7233"
  token_source = {
    kind = "file"
    ref  = "/etc/spillway/agent.token"
  }
  gpu_discovery = "static"
  static_gpus = [
    { model = "NVIDIA H100 80GB HBM3", memory_gib = 80, count = 8 },
  ]
}

output "user_data" {
  value = module.agent_bootstrap.user_data
}
