# Spillway agents on Azure: a Linux VM scale set (optionally in a capacity reservation group)
# whose machines boot the agent-bootstrap user data. The managed identity can read the token
# secret and the weights container and nothing else; machines have no public address and the
# network security group admits nothing from the internet.

locals {
  vault_name = element(split("/", var.key_vault_id), length(split("/", var.key_vault_id)) - 1)
  token_url  = "https://${local.vault_name}.vault.azure.net/secrets/${var.token_secret_name}"
}

module "bootstrap" {
  source = "../agent-bootstrap"

  agent_id             = var.name
  append_instance_id   = true
  cloud                = "azure"
  pool                 = var.pool
  region               = var.location
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
  temporal_client_cert_source = var.temporal_client_cert_secret_name == "" ? null : {
    kind = "azure-keyvault"
    ref  = "https://${local.vault_name}.vault.azure.net/secrets/${var.temporal_client_cert_secret_name}"
  }
  temporal_client_key_source = var.temporal_client_key_secret_name == "" ? null : {
    kind = "azure-keyvault"
    ref  = "https://${local.vault_name}.vault.azure.net/secrets/${var.temporal_client_key_secret_name}"
  }
  temporal_api_key_source = var.temporal_api_key_secret_name == "" ? null : {
    kind = "azure-keyvault"
    ref  = "https://${local.vault_name}.vault.azure.net/secrets/${var.temporal_api_key_secret_name}"
  }
  install_sglang     = var.install_sglang
  identity_client_id = azurerm_user_assigned_identity.agent.client_id
  token_source = {
    kind = "azure-keyvault"
    ref  = local.token_url
  }
  wheel_url         = var.wheel_url
  package_index_url = var.package_index_url
  package_version   = var.package_version
  system_packages   = var.system_packages
}

# --- identity: read the agent's secrets and the weights, nothing else ----------------------------

resource "azurerm_user_assigned_identity" "agent" {
  name                = "${var.name}-agent"
  resource_group_name = var.resource_group_name
  location            = var.location
  tags                = var.tags
}

resource "azurerm_role_assignment" "token" {
  scope                = "${var.key_vault_id}/secrets/${var.token_secret_name}"
  role_definition_name = "Key Vault Secrets User"
  principal_id         = azurerm_user_assigned_identity.agent.principal_id
}

resource "azurerm_role_assignment" "temporal" {
  for_each             = toset(compact([var.temporal_client_cert_secret_name, var.temporal_client_key_secret_name, var.temporal_api_key_secret_name]))
  scope                = "${var.key_vault_id}/secrets/${each.value}"
  role_definition_name = "Key Vault Secrets User"
  principal_id         = azurerm_user_assigned_identity.agent.principal_id
}

resource "azurerm_role_assignment" "weights" {
  scope                = "${var.weights_storage_account_id}/blobServices/default/containers/${var.weights_container_name}"
  role_definition_name = "Storage Blob Data Reader"
  principal_id         = azurerm_user_assigned_identity.agent.principal_id
}

# --- network: nothing in from the internet --------------------------------------------------

resource "azurerm_network_security_group" "agent" {
  name                = "${var.name}-agent"
  resource_group_name = var.resource_group_name
  location            = var.location
  tags                = var.tags

  dynamic "security_rule" {
    for_each = length(var.serving_cidr_blocks) > 0 ? [var.serving_cidr_blocks] : []
    content {
      name                       = "serving-networks-to-replicas"
      description                = "Replica ports from the serving networks only"
      priority                   = 1000
      direction                  = "Inbound"
      access                     = "Allow"
      protocol                   = "Tcp"
      source_address_prefixes    = security_rule.value
      source_port_range          = "*"
      destination_address_prefix = "VirtualNetwork"
      destination_port_range     = "30000-30999"
    }
  }

  security_rule {
    name                       = "deny-internet-inbound"
    description                = "Nothing from the internet, whatever other rules say"
    priority                   = 4000
    direction                  = "Inbound"
    access                     = "Deny"
    protocol                   = "*"
    source_address_prefix      = "Internet"
    source_port_range          = "*"
    destination_address_prefix = "*"
    destination_port_range     = "*"
  }
}

# --- machines -------------------------------------------------------------------------------

resource "azurerm_linux_virtual_machine_scale_set" "agent" {
  name                            = var.name
  resource_group_name             = var.resource_group_name
  location                        = var.location
  sku                             = var.sku
  instances                       = var.instances
  zones                           = length(var.zones) > 0 ? var.zones : null
  capacity_reservation_group_id   = var.capacity_reservation_group_id == "" ? null : var.capacity_reservation_group_id
  admin_username                  = var.admin_username
  disable_password_authentication = true
  encryption_at_host_enabled      = var.encryption_at_host_enabled
  custom_data                     = base64encode(module.bootstrap.user_data)
  upgrade_mode                    = "Manual"
  tags                            = var.tags

  admin_ssh_key {
    username   = var.admin_username
    public_key = var.admin_ssh_public_key
  }

  source_image_reference {
    publisher = var.source_image.publisher
    offer     = var.source_image.offer
    sku       = var.source_image.sku
    version   = var.source_image.version
  }

  os_disk {
    caching                = "ReadWrite"
    storage_account_type   = "Premium_LRS"
    disk_size_gb           = var.os_disk_size_gb
    disk_encryption_set_id = var.disk_encryption_set_id == "" ? null : var.disk_encryption_set_id
  }

  # No public_ip_address block: no public address.
  network_interface {
    name                      = "${var.name}-nic"
    primary                   = true
    network_security_group_id = azurerm_network_security_group.agent.id

    ip_configuration {
      name      = "internal"
      primary   = true
      subnet_id = var.subnet_id
    }
  }

  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.agent.id]
  }
}
