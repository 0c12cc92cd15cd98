output "user_data" {
  description = "The cloud-init user data (#cloud-config) that installs and starts the scheduler and the gateway. Contains no secret."
  value       = local.checked ? local.user_data : ""
}

output "user_data_base64" {
  description = "user_data, base64-encoded, for APIs that want it so (AWS launch templates, Azure custom_data)."
  value       = local.checked ? base64encode(local.user_data) : ""
}

output "scheduler_config" {
  description = "The scheduler config file (JSON, which is YAML) written to /etc/spillway/scheduler.yaml."
  value       = jsonencode(local.scheduler_config)
}

output "gateway_config" {
  description = "The gateway config file (JSON, which is YAML) written to /etc/spillway/gateway.yaml."
  value       = jsonencode(local.gateway_config)
}

output "service_names" {
  description = "Names of the systemd units that run the scheduler and the gateway."
  value       = ["spillway-scheduler.service", "spillway-gateway.service"]
}
