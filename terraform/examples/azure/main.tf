# One Standard_ND96isr_H100_v5 machine in a capacity reservation group in West Europe.
terraform {
  required_version = ">= 1.0.0"

  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = ">= 3.40, < 5.0"
    }
  }
}

provider "azurerm" {
  features {}
}

module "spillway_agents" {
  source = "../../modules/azure-agent"

  name                = "spillway-eu"
  resource_group_name = "spillway-gpu"
  location            = "westeurope"
  allowed_regions     = ["westeurope", "northeurope"]
  zones               = ["1"]
  pool                = "reserved-eu"
  residency_group     = "eu"

  subnet_id                     = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/network/providers/Microsoft.Network/virtualNetworks/main/subnets/gpu"
  sku                           = "Standard_ND96isr_H100_v5"
  instances                     = 1
  capacity_reservation_group_id = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/spillway-gpu/providers/Microsoft.Compute/capacityReservationGroups/h100-eu"
  admin_ssh_public_key          = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnlyForTheExample0000000000000 ops@example.com"

  scheduler_address          = "scheduler.spillway.internal:50051"
  temporal_address           = "temporal.spillway.internal:7233"
  serving_cidr_blocks        = ["10.16.8.0/24"]
  key_vault_id               = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/secrets/providers/Microsoft.KeyVault/vaults/spillway-kv"
  token_secret_name          = "spillway-agent-token"
  weights_storage_account_id = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/data/providers/Microsoft.Storage/storageAccounts/exampleweights"
  weights_container_name     = "models"
  package_version            = "0.1.0"
}

output "scale_set_id" {
  value = module.spillway_agents.scale_set_id
}
