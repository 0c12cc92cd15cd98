# Spillway agents on AWS: a launch template and an auto scaling group (optionally inside an
# On-Demand Capacity Reservation) whose machines boot the agent-bootstrap user data. The
# instance role can read the token secret and the weights bucket and nothing else; the security
# group admits nothing from the internet and machines get no public address.

data "aws_region" "current" {}

data "aws_partition" "current" {}

locals {
  control_plane_ports = distinct([
    for address in compact(concat([var.scheduler_address, var.temporal_address], var.scheduler_addresses)) :
    tonumber(regex(":([0-9]+)$", address)[0])
  ])
  provider_region_checked = data.aws_region.current.name == var.region ? true : tobool("region is ${var.region} but the aws provider runs in ${data.aws_region.current.name}: set region to the provider's region")
  tags                    = merge(var.tags, { "spillway:group" = var.name })
  # The node workers' Temporal certificate, key and API key, when they come from Secrets Manager.
  temporal_secret_arns = compact([var.temporal_client_cert_secret_arn, var.temporal_client_key_secret_arn, var.temporal_api_key_secret_arn])
}

module "bootstrap" {
  source = "../agent-bootstrap"

  agent_id             = var.name
  append_instance_id   = true
  cloud                = "aws"
  pool                 = var.pool
  region               = var.region
  allowed_regions      = var.allowed_regions
  residency_group      = var.residency_group
  extra_labels         = var.extra_labels
  scheduler_address    = var.scheduler_address
  scheduler_ca_pem     = var.scheduler_ca_pem
  scheduler_addresses  = var.scheduler_addresses
  temporal_address     = var.temporal_address
  temporal_namespace   = var.temporal_namespace
  temporal_server_name = var.temporal_server_name
  temporal_ca_pem      = var.temporal_ca_pem
  temporal_tls         = var.temporal_tls
  temporal_client_cert_source = var.temporal_client_cert_secret_arn == "" ? null : {
    kind = "aws-secretsmanager"
    ref  = var.temporal_client_cert_secret_arn
  }
  temporal_client_key_source = var.temporal_client_key_secret_arn == "" ? null : {
    kind = "aws-secretsmanager"
    ref  = var.temporal_client_key_secret_arn
  }
  temporal_api_key_source = var.temporal_api_key_secret_arn == "" ? null : {
    kind = "aws-secretsmanager"
    ref  = var.temporal_api_key_secret_arn
  }
  install_sglang = var.install_sglang
  token_source = {
    kind = "aws-secretsmanager"
    ref  = var.token_secret_arn
  }
  wheel_url         = var.wheel_url
  package_index_url = var.package_index_url
  package_version   = var.package_version
  system_packages   = var.system_packages
}

# --- identity: read the agent's secrets and the weights, nothing else ----------------------------

data "aws_iam_policy_document" "assume" {
  statement {
    sid     = "Ec2AssumesAgentRole"
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "agent" {
  statement {
    sid       = "ReadAgentSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = concat([var.token_secret_arn], local.temporal_secret_arns)
  }

  statement {
    sid       = "ListWeights"
    actions   = ["s3:ListBucket"]
    resources = ["arn:${data.aws_partition.current.partition}:s3:::${var.weights_bucket}"]
  }

  statement {
    sid       = "ReadWeights"
    actions   = ["s3:GetObject"]
    resources = ["arn:${data.aws_partition.current.partition}:s3:::${var.weights_bucket}/*"]
  }

  dynamic "statement" {
    for_each = var.token_secret_kms_key_arn == "" ? [] : [var.token_secret_kms_key_arn]
    content {
      sid       = "DecryptAgentTokenViaSecretsManager"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]
      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["secretsmanager.${var.region}.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role" "agent" {
  name_prefix        = "${var.name}-"
  description        = "Spillway agent machines of ${var.name}"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "agent" {
  name   = "spillway-agent"
  role   = aws_iam_role.agent.id
  policy = data.aws_iam_policy_document.agent.json
}

resource "aws_iam_instance_profile" "agent" {
  name_prefix = "${var.name}-"
  role        = aws_iam_role.agent.name
  tags        = local.tags
}

# --- network: nothing in from the internet --------------------------------------------------

resource "aws_security_group" "agent" {
  name_prefix = "${var.name}-"
  description = "Spillway agents: replica ports from the serving networks only; out to HTTPS and the control plane"
  vpc_id      = var.vpc_id
  tags        = local.tags

  dynamic "ingress" {
    for_each = length(var.serving_cidr_blocks) > 0 ? [var.serving_cidr_blocks] : []
    content {
      description = "Replica ports from the serving networks"
      from_port   = 30000
      to_port     = 30999
      protocol    = "tcp"
      cidr_blocks = ingress.value
    }
  }

  egress {
    description = "HTTPS: package index, Secrets Manager, S3 and model hubs"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }

  dynamic "egress" {
    for_each = local.control_plane_ports
    content {
      description = "Scheduler and Temporal"
      from_port   = egress.value
      to_port     = egress.value
      protocol    = "tcp"
      cidr_blocks = var.control_plane_cidr_blocks
    }
  }

  lifecycle {
    create_before_destroy = true
  }
}

# --- machines -------------------------------------------------------------------------------

resource "aws_launch_template" "agent" {
  name_prefix            = "${var.name}-"
  description            = "Spillway agent machines of ${var.name}"
  image_id               = var.ami_id
  instance_type          = var.instance_type
  ebs_optimized          = true
  update_default_version = true
  # gzip: AWS takes at most 16 KiB of user data; cloud-init unpacks it.
  user_data = base64gzip(module.bootstrap.user_data)
  tags      = local.tags

  iam_instance_profile {
    arn = aws_iam_instance_profile.agent.arn
  }

  network_interfaces {
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.agent.id]
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = var.root_device_name
    ebs {
      volume_size           = var.root_volume_size_gb
      volume_type           = "gp3"
      encrypted             = true
      kms_key_id            = var.ebs_kms_key_arn == "" ? null : var.ebs_kms_key_arn
      delete_on_termination = true
    }
  }

  capacity_reservation_specification {
    capacity_reservation_preference = var.capacity_reservation_id == "" ? "open" : null

    dynamic "capacity_reservation_target" {
      for_each = var.capacity_reservation_id == "" ? [] : [var.capacity_reservation_id]
      content {
        capacity_reservation_id = capacity_reservation_target.value
      }
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = var.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = local.tags
  }
}

resource "aws_autoscaling_group" "agent" {
  name_prefix         = "${var.name}-"
  min_size            = var.desired_capacity
  max_size            = var.max_size
  desired_capacity    = var.desired_capacity
  vpc_zone_identifier = var.subnet_ids
  health_check_type   = "EC2"

  launch_template {
    id      = aws_launch_template.agent.id
    version = aws_launch_template.agent.latest_version
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = var.name })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }
}
