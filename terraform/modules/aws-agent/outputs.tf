output "autoscaling_group_name" {
  description = "Name of the auto scaling group running the agents."
  value       = aws_autoscaling_group.agent.name
}

output "launch_template_id" {
  description = "Id of the launch template."
  value       = aws_launch_template.agent.id
}

output "role_arn" {
  description = "ARN of the agents' instance role (reads the token secret and the weights bucket only)."
  value       = aws_iam_role.agent.arn
}

output "security_group_id" {
  description = "Id of the agents' security group."
  value       = aws_security_group.agent.id
}

output "user_data" {
  description = "The cloud-init user data the machines boot with (before gzip). Contains no secret."
  value       = module.bootstrap.user_data
}
