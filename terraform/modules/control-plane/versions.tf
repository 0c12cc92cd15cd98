terraform {
  required_version = ">= 1.0.0"

  # No providers: this module only renders text, so it plans and applies offline.
  required_providers {}
}
