# Kubernetes manifests, one set per cluster (each cluster is its own Kubernetes cluster): a
# ConfigMap with the gateway file and the service files, a PersistentVolumeClaim for the state
# dir (identity, joined.json, catalog.json: a gateway must keep them across restarts), a
# one-replica Deployment (Recreate: one gateway per state dir) running as the image's user, a
# LoadBalancer Service for the inbound mTLS listener other gateways dial, and a ClusterIP
# Service for the import listeners apps connect to. The join token and the federation's CA are
# Secret references (var.kubernetes.join_secret key `token`, federation_ca_secret key `ca.pem`):
# create them with kubectl, never through Terraform state.
# The admin listener stays on the pod's loopback (plain HTTP, unauthenticated): the probes exec
# the image's healthcheck against /readyz and /healthz.
# Pods get SIGTERM on deletion, which stops a gateway at once: the preStop hook sends SIGQUIT
# first, so it drains (limits.drain_timeout) within terminationGracePeriodSeconds.
locals {
  k8s = var.kubernetes
  labels = { for name in keys(var.clusters) : name => {
    "app.kubernetes.io/name"      = "isthmus-gateway"
    "app.kubernetes.io/component" = "gateway"
    "isthmus.io/cluster"          = name
  } }
  import_ports = { for name in keys(var.clusters) : name => [
    for i in local.imports.kubernetes[name] : { name = "import-${substr(replace(i.name, "/[^a-z0-9-]/", "-"), 0, 8)}", port = tonumber(split(":", i.listen)[1]) }
  ] }

  config_map = { for name in keys(var.clusters) : name => {
    apiVersion = "v1"
    kind       = "ConfigMap"
    metadata   = { name = "isthmus-gateway-config", namespace = local.k8s.namespace, labels = local.labels[name] }
    data = merge(
      { "gateway.yaml" = yamlencode(local.gateway_files.kubernetes[name]) },
      { for file, body in local.service_files.kubernetes[name] : "services.${file}" => yamlencode(body) },
    )
  } }

  claim = { for name in keys(var.clusters) : name => {
    apiVersion = "v1"
    kind       = "PersistentVolumeClaim"
    metadata   = { name = "isthmus-gateway-state", namespace = local.k8s.namespace, labels = local.labels[name] }
    spec = {
      accessModes = ["ReadWriteOnce"]
      resources   = { requests = { storage = local.k8s.state_size } }
    }
  } }

  deployment = { for name in keys(var.clusters) : name => {
    apiVersion = "apps/v1"
    kind       = "Deployment"
    metadata   = { name = "isthmus-gateway", namespace = local.k8s.namespace, labels = local.labels[name] }
    spec = {
      replicas = 1
      strategy = { type = "Recreate" }
      selector = { matchLabels = local.labels[name] }
      template = {
        metadata = { labels = local.labels[name] }
        spec = {
          terminationGracePeriodSeconds = 15
          securityContext               = { runAsNonRoot = true, runAsUser = 10001, runAsGroup = 10001, fsGroup = 10001 }
          containers = [{
            name  = "gateway"
            image = local.k8s.image
            args  = ["gateway", "run", "--config", "/etc/isthmus/config/gateway.yaml"]
            ports = concat(
              [{ name = "inbound", containerPort = tonumber(local.port_of[name].inbound) }],
              [for p in local.import_ports[name] : { name = p.name, containerPort = p.port }],
            )
            readinessProbe = { exec = { command = ["python3", "/opt/isthmus/libexec/healthcheck.py", "http://127.0.0.1:${local.port_of[name].admin}/readyz"] }, periodSeconds = 5, timeoutSeconds = 3 }
            livenessProbe  = { exec = { command = ["python3", "/opt/isthmus/libexec/healthcheck.py", "http://127.0.0.1:${local.port_of[name].admin}/healthz"] }, periodSeconds = 10, timeoutSeconds = 3, failureThreshold = 3 }
            lifecycle      = { preStop = { exec = { command = ["sh", "-c", "kill -QUIT 1; sleep 7"] } } }
            resources      = { requests = { cpu = "100m", memory = "128Mi" }, limits = { memory = "512Mi" } }
            securityContext = {
              allowPrivilegeEscalation = false
              readOnlyRootFilesystem   = true
              capabilities             = { drop = ["ALL"] }
            }
            volumeMounts = [
              { name = "config", mountPath = "/etc/isthmus/config", readOnly = true },
              { name = "join-token", mountPath = "/etc/isthmus/join", readOnly = true },
              { name = "federation-ca", mountPath = "/etc/isthmus/federation", readOnly = true },
              { name = "state", mountPath = "/var/lib/isthmus" },
            ]
          }]
          volumes = [
            { name = "config", configMap = { name = "isthmus-gateway-config", items = concat(
              [{ key = "gateway.yaml", path = "gateway.yaml" }],
              [for file in keys(local.service_files.kubernetes[name]) : { key = "services.${file}", path = "services/${file}" }],
            ) } },
            { name = "join-token", secret = { secretName = local.k8s.join_secret, defaultMode = 384, items = [{ key = "token", path = "token" }] } },
            { name = "federation-ca", secret = { secretName = local.k8s.federation_ca_secret, items = [{ key = "ca.pem", path = "ca.pem" }] } },
            { name = "state", persistentVolumeClaim = { claimName = "isthmus-gateway-state" } },
          ]
        }
      }
    }
  } }

  inbound_service = { for name in keys(var.clusters) : name => {
    apiVersion = "v1"
    kind       = "Service"
    metadata   = { name = "isthmus-gateway", namespace = local.k8s.namespace, labels = local.labels[name] }
    spec = {
      type     = "LoadBalancer"
      selector = local.labels[name]
      ports    = [{ name = "inbound", port = tonumber(local.port_of[name].inbound), targetPort = "inbound", protocol = "TCP" }]
    }
  } }

  imports_service = { for name in keys(var.clusters) : name => {
    apiVersion = "v1"
    kind       = "Service"
    metadata   = { name = "isthmus-imports", namespace = local.k8s.namespace, labels = local.labels[name] }
    spec = {
      type     = "ClusterIP"
      selector = local.labels[name]
      ports    = [for p in local.import_ports[name] : { name = p.name, port = p.port, targetPort = p.name, protocol = "TCP" }]
    }
  } if length(local.import_ports[name]) > 0 }

  kubernetes_manifests = { for name in keys(var.clusters) : name => concat(
    [local.config_map[name], local.claim[name], local.deployment[name], local.inbound_service[name]],
    contains(keys(local.imports_service), name) ? [local.imports_service[name]] : [],
  ) }
}
