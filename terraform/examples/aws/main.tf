# Eight H100 machines from an On-Demand Capacity Reservation in Frankfurt, locked to the EU.
terraform {
  required_version = ">= 1.0.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 4.0, < 6.0"
    }
  }
}

provider "aws" {
  region = "eu-central-1"
}

module "spillway_agents" {
  source = "../../modules/aws-agent"

  name            = "spillway-eu"
  region          = "eu-central-1"
  allowed_regions = ["eu-central-1", "eu-west-1"]
  pool            = "reserved-eu"
  residency_group = "eu"

  vpc_id                  = "vpc-0123456789abcdef0"
  subnet_ids              = ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]
  ami_id                  = "ami-0123456789abcdef0"
  instance_type           = "p5.48xlarge"
  capacity_reservation_id = "cr-0123456789abcdef0"
  desired_capacity        = 1
  max_size                = 1

  scheduler_address         = "scheduler.spillway.internal:50051"
  temporal_address          = "temporal.spillway.internal:7233"
  control_plane_cidr_blocks = ["10.0.0.0/16"]
  serving_cidr_blocks       = ["10.0.8.0/24"]
  token_secret_arn          = "arn:aws:secretsmanager:eu-central-1:123456789012:secret:spillway-agent-token"
  weights_bucket            = "example-model-weights-eu"
  package_version           = "0.1.0"

  tags = {
    team = "inference"
  }
}

output "autoscaling_group" {
  value = module.spillway_agents.autoscaling_group_name
}
