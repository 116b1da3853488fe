output "gateway_files" {
  description = "target (compose | kubernetes) -> cluster -> the gateway file (YAML)."
  value       = { for target, files in local.gateway_files : target => { for name, f in files : name => yamlencode(f) } }
}

output "service_files" {
  description = "target (compose | kubernetes) -> cluster -> file name (services/<name>) -> the service file (YAML)."
  value       = { for target, files in local.service_files : target => { for name, fs in files : name => { for file, body in fs : file => yamlencode(body) } } }
}

output "compose_file" {
  description = "The compose file (YAML); mount each cluster's files from <config_dir>/<cluster>."
  value       = yamlencode(local.compose_file)
}

output "compose_config_dir" {
  description = "Where the compose file mounts each cluster's files from (relative to it)."
  value       = var.compose.config_dir
}

output "kubernetes_manifests" {
  description = "cluster -> the manifests to apply in that Kubernetes cluster (objects)."
  value       = local.kubernetes_manifests
}

output "kubernetes_yaml" {
  description = "cluster -> the same manifests as one multi-document YAML stream."
  value       = { for name, ms in local.kubernetes_manifests : name => join("---\n", [for m in ms : yamlencode(m)]) }
}

output "kubernetes_federation_manifests" {
  description = "The federation's manifests (objects), for the Kubernetes cluster that hosts it."
  value       = local.federation_manifests
}

output "kubernetes_federation_yaml" {
  description = "The same as one multi-document YAML stream."
  value       = join("---\n", [for m in local.federation_manifests : yamlencode(m)])
}
