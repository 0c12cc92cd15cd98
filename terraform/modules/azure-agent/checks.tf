# Checks that span two variables (Terraform 1.0 validation blocks can only see their own).
# A failed check stops the plan with its message: tobool refuses any string but true/false.
locals {
  input_problems = compact([
    contains(var.allowed_regions, var.location) ? "" : "location ${var.location} is not in allowed_regions [${join(", ", var.allowed_regions)}]: set location to one of them or extend allowed_regions",
  ])
  inputs_checked = length(local.input_problems) == 0 ? true : tobool(join("; ", local.input_problems))
}
