# Spillway agents on GCP: an instance template and a regional managed instance group (optionally
# consuming a specific reservation) whose machines boot the agent-bootstrap user data. The
# service account can read the token secret and the weights bucket and nothing else; machines
# have no external address and the only ingress rule admits the serving networks.

locals {
  network_tag = "${var.name}-agent"
}

module "bootstrap" {
  source = "../agent-bootstrap"

  agent_id             = var.name
  append_instance_id   = true
  cloud                = "gcp"
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
  temporal_client_cert_source = var.temporal_client_cert_secret_id == "" ? null : {
    kind = "gcp-secretmanager"
    ref  = var.temporal_client_cert_secret_id
  }
  temporal_client_key_source = var.temporal_client_key_secret_id == "" ? null : {
    kind = "gcp-secretmanager"
    ref  = var.temporal_client_key_secret_id
  }
  temporal_api_key_source = var.temporal_api_key_secret_id == "" ? null : {
    kind = "gcp-secretmanager"
    ref  = var.temporal_api_key_secret_id
  }
  install_sglang = var.install_sglang
  token_source = {
    kind = "gcp-secretmanager"
    ref  = var.token_secret_id
  }
  wheel_url         = var.wheel_url
  package_index_url = var.package_index_url
  package_version   = var.package_version
  system_packages   = var.system_packages
}

# --- identity: read the agent's secrets and the weights, nothing else ----------------------------

resource "google_service_account" "agent" {
  project      = var.project_id
  account_id   = "${var.name}-agent"
  display_name = "Spillway agents of ${var.name}"
}

resource "google_secret_manager_secret_iam_member" "token" {
  project   = split("/", var.token_secret_id)[1]
  secret_id = var.token_secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.agent.email}"
}

resource "google_secret_manager_secret_iam_member" "temporal" {
  for_each  = toset(compact([var.temporal_client_cert_secret_id, var.temporal_client_key_secret_id, var.temporal_api_key_secret_id]))
  project   = split("/", each.value)[1]
  secret_id = each.value
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.agent.email}"
}

resource "google_storage_bucket_iam_member" "weights" {
  bucket = var.weights_bucket
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.agent.email}"
}

# --- network: nothing in from the internet --------------------------------------------------

resource "google_compute_firewall" "serving" {
  count       = length(var.serving_cidr_blocks) > 0 ? 1 : 0
  project     = var.project_id
  name        = "${var.name}-serving"
  description = "Replica ports of the Spillway agents of ${var.name}, from the serving networks only"
  network     = var.network
  direction   = "INGRESS"

  source_ranges = var.serving_cidr_blocks
  target_tags   = [local.network_tag]

  allow {
    protocol = "tcp"
    ports    = ["30000-30999"]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# --- machines -------------------------------------------------------------------------------

resource "google_compute_instance_template" "agent" {
  project      = var.project_id
  region       = var.region
  name_prefix  = "${var.name}-"
  description  = "Spillway agent machines of ${var.name}"
  machine_type = var.machine_type
  tags         = [local.network_tag]
  labels       = var.labels

  metadata = {
    user-data              = module.bootstrap.user_data
    block-project-ssh-keys = "true"
    enable-oslogin         = "TRUE"
  }

  disk {
    source_image = var.source_image
    boot         = true
    auto_delete  = true
    disk_type    = "pd-balanced"
    disk_size_gb = var.boot_disk_size_gb

    dynamic "disk_encryption_key" {
      for_each = var.boot_disk_kms_key == "" ? [] : [var.boot_disk_kms_key]
      content {
        kms_key_self_link = disk_encryption_key.value
      }
    }
  }

  # No access_config block: no external address.
  network_interface {
    subnetwork = var.subnetwork
  }

  service_account {
    email  = google_service_account.agent.email
    scopes = ["cloud-platform"]
  }

  scheduling {
    on_host_maintenance = "TERMINATE"
    automatic_restart   = true
    preemptible         = false
  }

  dynamic "guest_accelerator" {
    for_each = var.accelerator_count > 0 ? [var.accelerator_type] : []
    content {
      type  = guest_accelerator.value
      count = var.accelerator_count
    }
  }

  dynamic "reservation_affinity" {
    for_each = var.reservation_name == "" ? [] : [var.reservation_name]
    content {
      type = "SPECIFIC_RESERVATION"
      specific_reservation {
        key    = "compute.googleapis.com/reservation-name"
        values = [reservation_affinity.value]
      }
    }
  }

  shielded_instance_config {
    enable_secure_boot          = var.enable_secure_boot
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "google_compute_region_instance_group_manager" "agent" {
  project                   = var.project_id
  region                    = var.region
  name                      = var.name
  base_instance_name        = var.name
  target_size               = var.target_size
  distribution_policy_zones = length(var.zones) > 0 ? var.zones : null

  version {
    instance_template = google_compute_instance_template.agent.id
  }
}
