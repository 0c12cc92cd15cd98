output "user_data" {
  description = "The cloud-init user data (#cloud-config) that installs and starts the agent. Contains no secret."
  value       = local.checked ? local.user_data : ""
}

output "user_data_base64" {
  description = "user_data, base64-encoded, for APIs that want it so (AWS launch templates, Azure custom_data)."
  value       = local.checked ? base64encode(local.user_data) : ""
}

output "agent_config" {
  description = "The agent config file (JSON, which is YAML) written to /etc/spillway/agent.yaml, before the machine fills in its identity."
  value       = jsonencode(local.agent_config)
}

output "service_name" {
  description = "Name of the systemd unit that runs the agent."
  value       = "spillway-agent.service"
}
