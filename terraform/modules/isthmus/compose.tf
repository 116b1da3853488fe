# The compose file: the same shape as compose/demo.yaml (see its comments for why each part is
# there): host networking, a named volume per process, a one-shot `join-tokens` service, and
# healthchecks with depends_on conditions. The config of cluster C is mounted from
# <config_dir>/C (write gateway_files.compose[C] to gateway.yaml there and service_files to
# services/).
locals {
  healthcheck = {
    test         = ["CMD", "python3", "/opt/isthmus/libexec/healthcheck.py"]
    interval     = "2s"
    timeout      = "2s"
    retries      = 3
    start_period = "20s"
  }
  base_service = {
    image        = var.compose.image
    network_mode = "host"
    restart      = "on-failure"
  }
  fed_health_url = "http://${var.federation.admin}/healthz"

  join_script = <<-EOT
    set -eu
    tries=0
    until python3 /opt/isthmus/libexec/healthcheck.py 2>/dev/null; do
      tries=$$((tries + 1)); [ $$tries -lt 60 ] || { echo "join-tokens: federation not healthy after 60 s" >&2; exit 1; }
      sleep 1
    done
    for cluster in ${join(" ", keys(var.clusters))}; do
      [ -s /join/$$cluster.token ] && continue
      isthmus federation token create --state-dir /var/lib/isthmus --cluster $$cluster --ttl 1h -o /join/$$cluster.token
    done
    cp /var/lib/isthmus/ca.pem /join/.ca.pem && mv /join/.ca.pem /join/ca.pem
  EOT

  # cluster -> the ports of its exported endpoints on 127.0.0.1 (the demo's echo backends)
  echo_ports = { for name in keys(var.clusters) : name => distinct(flatten([
    for s in var.services : [for e in lookup(s.endpoints, name, []) : split(":", e)[1] if startswith(e, "127.0.0.1:")]
  ])) }

  compose_services = merge(
    {
      federation = merge(local.base_service, {
        command = ["federation", "serve", "--state-dir", "/var/lib/isthmus",
          "--listen", var.federation.listen, "--admin", var.federation.admin,
        "--lease-ttl", var.federation.lease_ttl]
        environment       = { ISTHMUS_HEALTH_URL = local.fed_health_url }
        volumes           = ["federation-state:/var/lib/isthmus"]
        stop_grace_period = "10s"
        healthcheck       = local.healthcheck
      })
      join-tokens = merge(local.base_service, {
        restart     = "no"
        entrypoint  = ["sh", "-c"]
        command     = [local.join_script]
        environment = { ISTHMUS_HEALTH_URL = local.fed_health_url }
        volumes     = ["federation-state:/var/lib/isthmus", "join:/join"]
      })
    },
    { for name, c in var.clusters : name => merge(local.base_service, {
      stop_signal       = "SIGQUIT"
      stop_grace_period = "10s"
      depends_on = {
        federation  = { condition = "service_healthy" }
        join-tokens = { condition = "service_completed_successfully" }
      }
      command     = ["gateway", "run", "--config", "/etc/isthmus/gateway.yaml"]
      environment = { ISTHMUS_HEALTH_URL = "http://${c.admin}/healthz" }
      volumes     = ["${var.compose.config_dir}/${name}:/etc/isthmus:ro", "${name}-state:/var/lib/isthmus", "join:/join:ro"]
      healthcheck = local.healthcheck
    }) },
    { for name, ports in local.echo_ports : "echo-${name}" => merge(local.base_service, {
      entrypoint  = ["python3", "/opt/isthmus/libexec/echo_backend.py"]
      command     = concat([name], ports)
      tmpfs       = ["/var/lib/isthmus"]
      healthcheck = { disable = true }
    }) if var.compose.echo_backends && length(ports) > 0 },
  )

  compose_file = {
    name     = var.compose.name
    services = local.compose_services
    volumes  = merge({ federation-state = null, join = null }, { for name in keys(var.clusters) : "${name}-state" => null })
  }
}
