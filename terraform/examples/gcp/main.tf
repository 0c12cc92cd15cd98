# Two a3-highgpu-8g machines consuming a specific reservation in europe-west4, locked to the EU.
terraform {
  required_version = ">= 1.0.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 4.50, < 7.0"
    }
  }
}

provider "google" {
  project = "example-project"
  region  = "europe-west4"
}

module "spillway_agents" {
  source = "../../modules/gcp-agent"

  name            = "spillway-eu"
  project_id      = "example-project"
  region          = "europe-west4"
  allowed_regions = ["europe-west4", "europe-west1"]
  zones           = ["europe-west4-a"]
  pool            = "reserved-eu"
  residency_group = "eu"

  network          = "projects/example-project/global/networks/gpu"
  subnetwork       = "projects/example-project/regions/europe-west4/subnetworks/gpu"
  machine_type     = "a3-highgpu-8g"
  source_image     = "projects/deeplearning-platform-release/global/images/family/common-cu123-ubuntu-2204"
  reservation_name = "h100-eu"
  target_size      = 2

  scheduler_address   = "scheduler.spillway.internal:50051"
  temporal_address    = "temporal.spillway.internal:7233"
  serving_cidr_blocks = ["10.8.0.0/24"]
  token_secret_id     = "projects/example-project/secrets/spillway-agent-token"
  weights_bucket      = "example-model-weights-eu"
  package_version     = "0.1.0"
}

output "instance_group_manager" {
  value = module.spillway_agents.instance_group_manager
}
