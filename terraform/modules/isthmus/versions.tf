# Provider-free on purpose: variables, locals and outputs only, so `terraform init`, `plan`,
# `apply` and `terraform test` work with no provider to download. Roots that apply the rendered
# manifests with a provider (../../kubernetes) stay thin.
terraform {
  required_version = ">= 1.9" # cross-variable validation
}
