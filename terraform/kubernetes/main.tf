# Applies one cluster's gateway manifests (rendered by ../modules/isthmus) to that cluster's
# Kubernetes API. Thin on purpose: all logic is in the provider-free module, which
# `terraform test` covers; this root only hands each manifest to the provider. Before the first
# apply, create the Secrets the Deployment reads (never through Terraform state):
#   kubectl -n isthmus-system create secret generic isthmus-join-token --from-file=token=east-1.token
#   kubectl -n isthmus-system create secret generic isthmus-federation-ca --from-file=ca.pem=ca.pem
# Then: terraform init && terraform apply -var-file=topology.tfvars -var cluster=east-1
terraform {
  required_version = ">= 1.9"
  required_providers {
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = ">= 2.30"
    }
  }
}

variable "cluster" {
  description = "Which cluster's gateway this apply is for (a key of var.clusters)."
  type        = string
}
variable "kubeconfig" {
  description = "The kubeconfig of that cluster."
  type        = string
  default     = "~/.kube/config"
}
variable "federation" { type = any }
variable "clusters" { type = any }
variable "services" { type = any }
variable "policies" {
  type    = any
  default = { default = {} }
}
variable "gateway_settings" {
  type    = any
  default = {}
}
variable "kubernetes" {
  type    = any
  default = {}
}

provider "kubernetes" {
  config_path = var.kubeconfig
}

module "isthmus" {
  source           = "../modules/isthmus"
  federation       = var.federation
  clusters         = var.clusters
  services         = var.services
  policies         = var.policies
  gateway_settings = var.gateway_settings
  kubernetes       = var.kubernetes
}

resource "kubernetes_manifest" "gateway" {
  for_each = { for m in module.isthmus.kubernetes_manifests[var.cluster] : "${m.kind}/${m.metadata.name}" => m }
  manifest = each.value
}
