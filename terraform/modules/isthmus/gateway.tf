# Gateway files (the cluster admin's) and service files (the app teams'), one set per target:
# `compose` (host networking: the addresses as given; CA and join token from the `join` volume)
# and `kubernetes` (inbound and imports on 0.0.0.0 at the given ports, admin on loopback; CA
# and token from Secrets).
locals {
  federation_url = coalesce(var.federation.url, "https://${var.federation.listen}")

  paths = {
    compose = {
      ca_file    = "/join/ca.pem"
      token_file = "/join/{cluster}.token"
    }
    kubernetes = {
      ca_file    = "/etc/isthmus/federation/ca.pem"
      token_file = "/etc/isthmus/join/token"
    }
  }

  port_of = { for name, c in var.clusters : name => {
    inbound = split(":", c.inbound)[1]
    admin   = split(":", c.admin)[1]
  } }

  gateway_files = { for target, p in local.paths : target => { for name, c in var.clusters : name => merge(
    var.gateway_settings,
    {
      cluster = { for k, v in { name = name, region = c.region, zone = c.zone, trust_domain = c.trust_domain } : k => v if v != null }
      federation = {
        url        = target == "kubernetes" ? coalesce(var.kubernetes.federation_url, local.federation_url) : local.federation_url
        ca_file    = p.ca_file
        token_file = replace(p.token_file, "{cluster}", name)
      }
      # in a pod: inbound on every address (its Service is the way in; peers dial `advertise`),
      # admin on the pod's loopback (probes exec the image's healthcheck)
      listen = target == "compose" ? { for k, v in { inbound = c.inbound, admin = c.admin, advertise = c.advertise } : k => v if v != null } : {
        inbound   = "0.0.0.0:${local.port_of[name].inbound}"
        admin     = "127.0.0.1:${local.port_of[name].admin}"
        advertise = coalesce(c.advertise, c.inbound)
      }
      state_dir    = "/var/lib/isthmus"
      services_dir = "services"
    },
    # in a pod, imports listen on the pod's addresses (its Service exposes them)
    target == "kubernetes" ? { policy = merge(try(var.gateway_settings.policy, {}), { import_listen = ["0.0.0.0/32"] }) } : {},
  ) } }

  exports = { for name in keys(var.clusters) : name => [for svc, s in var.services : {
    for k, v in {
      name         = svc
      namespace    = s.namespace
      port         = s.port
      protocol     = s.protocol
      endpoints    = s.endpoints[name]
      health_check = { for hk, hv in s.health_check : hk => hv if hv != null }
    } : k => v if v != null
  } if contains(keys(s.endpoints), name)] }

  imports = { for target in keys(local.paths) : target => { for name in keys(var.clusters) : name => [
    for svc, s in var.services : {
      name      = svc
      namespace = s.namespace
      listen    = target == "compose" ? s.imports[name].listen : "0.0.0.0:${split(":", s.imports[name].listen)[1]}"
      failover  = { for k, v in var.policies[coalesce(s.imports[name].policy, s.policy)] : k => v if v != null }
    } if contains(keys(s.imports), name)
  ] } }

  # cluster -> service file name -> its content (one file per service the cluster takes part in)
  service_files = { for target in keys(local.paths) : target => { for name in keys(var.clusters) : name => {
    for svc, s in var.services : "${svc}.yaml" => merge(
      length([for e in local.exports[name] : e if e.name == svc]) > 0 ? { exports = [for e in local.exports[name] : e if e.name == svc] } : {},
      length([for i in local.imports[target][name] : i if i.name == svc]) > 0 ? { imports = [for i in local.imports[target][name] : i if i.name == svc] } : {},
    ) if contains(keys(s.endpoints), name) || contains(keys(s.imports), name)
  } } }
}
