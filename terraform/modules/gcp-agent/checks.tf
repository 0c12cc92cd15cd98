# Checks that span two variables (Terraform 1.0 validation blocks can only see their own).
# A failed check stops the plan with its message: tobool refuses any string but true/false.
locals {
  input_problems = compact([
    contains(var.allowed_regions, var.region) ? "" : "region ${var.region} is not in allowed_regions [${join(", ", var.allowed_regions)}]: set region to one of them or extend allowed_regions",
    alltrue([for zone in var.zones : substr(zone, 0, length(var.region) + 1) == "${var.region}-"]) ? "" : "zones [${join(", ", var.zones)}] must all be in region ${var.region}: fix zones or region",
    (var.accelerator_type == "") == (var.accelerator_count == 0) ? "" : "set accelerator_type and accelerator_count together, or neither",
  ])
  inputs_checked = length(local.input_problems) == 0 ? true : tobool(join("; ", local.input_problems))
}
