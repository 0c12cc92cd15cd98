output "scale_set_id" {
  description = "Resource id of the VM scale set running the agents."
  value       = azurerm_linux_virtual_machine_scale_set.agent.id
}

output "identity_principal_id" {
  description = "Principal id of the agents' managed identity (reads the token secret and the weights container only)."
  value       = azurerm_user_assigned_identity.agent.principal_id
}

output "network_security_group_id" {
  description = "Resource id of the agents' network security group."
  value       = azurerm_network_security_group.agent.id
}

output "user_data" {
  description = "The cloud-init user data the machines boot with. Contains no secret."
  value       = module.bootstrap.user_data
}
