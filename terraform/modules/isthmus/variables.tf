variable "federation" {
  description = "The federation service: its TLS API and admin addresses (host:port) and lease ttl."
  type = object({
    listen    = string
    admin     = string
    url       = optional(string) # what gateways dial; default https://<listen>
    lease_ttl = optional(string, "6s")
  })
  validation {
    condition     = alltrue([for a in [var.federation.listen, var.federation.admin] : can(regex("^[^:]+:[0-9]{1,5}$", a))])
    error_message = "federation.listen and federation.admin must be host:port."
  }
}

variable "clusters" {
  description = "One gateway per cluster, keyed by cluster name: locality and addresses (host:port)."
  type = map(object({
    region       = string
    zone         = string
    inbound      = string           # the mTLS listener other gateways dial
    advertise    = optional(string) # what they dial when that differs (Kubernetes: the LoadBalancer's address)
    admin        = string           # /healthz /readyz /metrics /status
    trust_domain = optional(string)
  }))
  validation {
    condition     = alltrue([for name, c in var.clusters : can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", name))])
    error_message = "cluster names must be DNS labels (lowercase letters, digits, '-', at most 63)."
  }
  validation {
    condition     = alltrue([for c in var.clusters : can(regex("^[^:]+:[0-9]{1,5}$", c.inbound)) && can(regex("^[^:]+:[0-9]{1,5}$", c.admin))])
    error_message = "every cluster's inbound and admin must be host:port."
  }
}

variable "services" {
  description = <<-EOT
    Services keyed by name: who exports it (cluster -> endpoints), who imports it (cluster ->
    local listen address, and optionally a policy of its own), and the failover policy (a key
    of var.policies) its imports use unless they name one.
  EOT
  type = map(object({
    namespace = optional(string, "default")
    port      = number
    protocol  = optional(string, "tcp")
    endpoints = optional(map(list(string)), {})
    imports = optional(map(object({
      listen = string
      policy = optional(string)
    })), {})
    policy = optional(string, "default")
    health_check = optional(object({
      kind                = optional(string, "tcp")
      interval            = optional(string, "1s")
      timeout             = optional(string, "500ms")
      healthy_threshold   = optional(number)
      unhealthy_threshold = optional(number)
    }), {})
  }))
  validation {
    condition = alltrue(flatten([for s in var.services : [
      for c in concat(keys(s.endpoints), keys(s.imports)) : contains(keys(var.clusters), c)
    ]]))
    error_message = "a service names a cluster (in endpoints or imports) that is not in var.clusters."
  }
  validation {
    condition = alltrue(flatten([for s in var.services : [
      for p in concat([s.policy], [for i in values(s.imports) : i.policy if i.policy != null]) : contains(keys(var.policies), p)
    ]]))
    error_message = "a service names a policy that is not in var.policies."
  }
}

variable "policies" {
  description = "Failover policies keyed by name, attached to imports through services[*].policy."
  type = map(object({
    tiers             = optional(list(string), ["cluster", "zone", "region", "any"])
    region_preference = optional(list(string))
    failback_after    = optional(string, "2s")
    max_attempts      = optional(number)
  }))
  default = { default = {} }
  validation {
    condition = alltrue(flatten([for p in var.policies : [
      for t in p.tiers : contains(["cluster", "zone", "region", "any"], t)
    ]]))
    error_message = "policy tiers are cluster, zone, region or any."
  }
}

variable "gateway_settings" {
  description = "More top-level sections of every gateway file (limits, outlier_detection, peer_probe, policy, ...), as the config reference spells them."
  type        = any
  default     = {}
}

variable "compose" {
  description = "The compose file: project name, image, where each cluster's config directory is (relative to the compose file), and whether to add the demo's echo backends for exported 127.0.0.1 endpoints."
  type = object({
    name          = optional(string, "isthmus")
    image         = optional(string, "$${ISTHMUS_IMAGE:-localhost/isthmus:latest}")
    config_dir    = optional(string, "./config")
    echo_backends = optional(bool, false)
  })
  default = {}
}

variable "kubernetes" {
  description = "The Kubernetes manifests: namespace, image, state volume size, and the names of the Secrets each gateway reads (made outside Terraform: a join token is a secret)."
  type = object({
    namespace            = optional(string, "isthmus-system")
    federation_url       = optional(string) # as reached from the pods; default federation.url
    image                = optional(string, "localhost/isthmus:latest")
    state_size           = optional(string, "1Gi")
    join_secret          = optional(string, "isthmus-join-token")    # key `token`
    federation_ca_secret = optional(string, "isthmus-federation-ca") # key `ca.pem`
  })
  default = {}
}
