output "instance_group_manager" {
  description = "Self link of the regional managed instance group running the agents."
  value       = google_compute_region_instance_group_manager.agent.self_link
}

output "instance_template" {
  description = "Self link of the instance template."
  value       = google_compute_instance_template.agent.self_link
}

output "service_account_email" {
  description = "Service account of the agents (reads the token secret and the weights bucket only)."
  value       = google_service_account.agent.email
}

output "user_data" {
  description = "The cloud-init user data the machines boot with. Contains no secret."
  value       = module.bootstrap.user_data
}
