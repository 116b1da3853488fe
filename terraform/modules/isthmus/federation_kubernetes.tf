# The federation's manifests, for the Kubernetes cluster that hosts it: a PersistentVolumeClaim
# for its state dir (CA, key, SQLite store, operator credentials), a one-replica Deployment
# (Recreate: one process per SQLite store) and a LoadBalancer Service for its TLS API at
# federation.listen's port (gateways dial federation.url / kubernetes.federation_url). Its admin
# listener stays on the pod's loopback. After the first start, take its CA to every gateway's
# cluster and make join tokens there:
#   kubectl exec deploy/isthmus-federation -- cat /var/lib/isthmus/ca.pem > ca.pem
#   kubectl exec deploy/isthmus-federation -- isthmus federation token create \
#       --state-dir /var/lib/isthmus --cluster east-1 > east-1.token
locals {
  fed_labels = {
    "app.kubernetes.io/name"      = "isthmus-federation"
    "app.kubernetes.io/component" = "federation"
  }
  fed_port  = tonumber(split(":", var.federation.listen)[1])
  fed_admin = tonumber(split(":", var.federation.admin)[1])

  federation_manifests = [
    {
      apiVersion = "v1"
      kind       = "PersistentVolumeClaim"
      metadata   = { name = "isthmus-federation-state", namespace = local.k8s.namespace, labels = local.fed_labels }
      spec = {
        accessModes = ["ReadWriteOnce"]
        resources   = { requests = { storage = local.k8s.state_size } }
      }
    },
    {
      apiVersion = "apps/v1"
      kind       = "Deployment"
      metadata   = { name = "isthmus-federation", namespace = local.k8s.namespace, labels = local.fed_labels }
      spec = {
        replicas = 1
        strategy = { type = "Recreate" }
        selector = { matchLabels = local.fed_labels }
        template = {
          metadata = { labels = local.fed_labels }
          spec = {
            terminationGracePeriodSeconds = 15
            securityContext               = { runAsNonRoot = true, runAsUser = 10001, runAsGroup = 10001, fsGroup = 10001 }
            containers = [{
              name  = "federation"
              image = local.k8s.image
              args = ["federation", "serve", "--state-dir", "/var/lib/isthmus",
                "--listen", "0.0.0.0:${local.fed_port}", "--admin", "127.0.0.1:${local.fed_admin}",
              "--lease-ttl", var.federation.lease_ttl]
              ports          = [{ name = "api", containerPort = local.fed_port }]
              readinessProbe = { exec = { command = ["python3", "/opt/isthmus/libexec/healthcheck.py", "http://127.0.0.1:${local.fed_admin}/readyz"] }, periodSeconds = 5, timeoutSeconds = 3 }
              livenessProbe  = { exec = { command = ["python3", "/opt/isthmus/libexec/healthcheck.py", "http://127.0.0.1:${local.fed_admin}/healthz"] }, periodSeconds = 10, timeoutSeconds = 3, failureThreshold = 3 }
              resources      = { requests = { cpu = "100m", memory = "128Mi" }, limits = { memory = "512Mi" } }
              securityContext = {
                allowPrivilegeEscalation = false
                readOnlyRootFilesystem   = true
                capabilities             = { drop = ["ALL"] }
              }
              volumeMounts = [{ name = "state", mountPath = "/var/lib/isthmus" }]
            }]
            volumes = [{ name = "state", persistentVolumeClaim = { claimName = "isthmus-federation-state" } }]
          }
        }
      }
    },
    {
      apiVersion = "v1"
      kind       = "Service"
      metadata   = { name = "isthmus-federation", namespace = local.k8s.namespace, labels = local.fed_labels }
      spec = {
        type     = "LoadBalancer"
        selector = local.fed_labels
        ports    = [{ name = "api", port = local.fed_port, targetPort = "api", protocol = "TCP" }]
      }
    },
  ]
}
