# What the module renders for a small topology: two exporting clusters and a consumer.
variables {
  federation = { listen = "127.0.0.1:17443", admin = "127.0.0.1:17080" }
  clusters = {
    east-1 = { region = "us-east", zone = "a", inbound = "127.0.0.1:15101", admin = "127.0.0.1:15102" }
    west-1 = { region = "us-west", zone = "a", inbound = "127.0.0.1:15301", admin = "127.0.0.1:15302", trust_domain = "west.example" }
    edge-1 = { region = "eu-west", zone = "a", inbound = "127.0.0.1:15401", admin = "127.0.0.1:15402" }
  }
  services = {
    echo = {
      port      = 8080
      endpoints = { east-1 = ["127.0.0.1:18101"], west-1 = ["127.0.0.1:18301", "127.0.0.1:18302"] }
      imports = {
        east-1 = { listen = "127.0.0.1:16101" }
        edge-1 = { listen = "127.0.0.1:16401", policy = "prefer-us-east" }
      }
    }
  }
  policies = {
    default        = {}
    prefer-us-east = { region_preference = ["us-east", "us-west"], max_attempts = 3 }
  }
}

run "gateway_and_service_files" {
  command = plan

  assert {
    condition     = yamldecode(output.gateway_files.compose["east-1"]).federation.token_file == "/join/east-1.token"
    error_message = "the compose gateway file names its cluster's token in the join volume"
  }
  assert {
    condition     = yamldecode(output.gateway_files.compose["east-1"]).federation.url == "https://127.0.0.1:17443"
    error_message = "the federation url defaults to https://<listen>"
  }
  assert {
    condition     = yamldecode(output.gateway_files.compose["west-1"]).cluster.trust_domain == "west.example"
    error_message = "a given trust domain is kept"
  }
  assert {
    condition     = !contains(keys(yamldecode(output.gateway_files.compose["east-1"]).cluster), "trust_domain")
    error_message = "no trust_domain key when none is given (the gateway's default applies)"
  }
  assert {
    condition     = !contains(keys(yamldecode(output.service_files.compose["edge-1"]["echo.yaml"])), "exports")
    error_message = "a consumer-only cluster exports nothing"
  }
  assert {
    condition     = tolist(yamldecode(output.service_files.compose["edge-1"]["echo.yaml"]).imports[0].failover.region_preference) == tolist(["us-east", "us-west"])
    error_message = "an import's own policy wins over the service's"
  }
  assert {
    condition     = tolist(yamldecode(output.service_files.compose["east-1"]["echo.yaml"]).imports[0].failover.tiers) == tolist(["cluster", "zone", "region", "any"])
    error_message = "the default policy's tiers"
  }
  assert {
    condition     = !contains(keys(yamldecode(output.service_files.compose["west-1"]["echo.yaml"])), "imports")
    error_message = "west-1 exports echo but does not import it"
  }
  assert {
    condition     = tolist(yamldecode(output.service_files.compose["west-1"]["echo.yaml"]).exports[0].endpoints) == tolist(["127.0.0.1:18301", "127.0.0.1:18302"])
    error_message = "an export lists its cluster's endpoints"
  }
  assert {
    condition     = yamldecode(output.service_files.kubernetes["edge-1"]["echo.yaml"]).imports[0].listen == "0.0.0.0:16401"
    error_message = "in a pod, imports listen on the pod's addresses at the same port"
  }
  assert {
    condition     = yamldecode(output.gateway_files.kubernetes["east-1"]).listen.inbound == "0.0.0.0:15101"
    error_message = "in a pod, the inbound listener binds 0.0.0.0 at the given port"
  }
  assert {
    condition     = yamldecode(output.gateway_files.kubernetes["east-1"]).listen.advertise == "127.0.0.1:15101"
    error_message = "in a pod, peers dial advertise (default: the given inbound address)"
  }
  assert {
    condition     = yamldecode(output.gateway_files.kubernetes["east-1"]).listen.admin == "127.0.0.1:15102"
    error_message = "in a pod, the admin listener stays on loopback"
  }
}

run "compose_file" {
  command = plan

  assert {
    condition     = tolist(sort(keys(yamldecode(output.compose_file).services))) == tolist(["east-1", "edge-1", "federation", "join-tokens", "west-1"])
    error_message = "federation, join-tokens and a gateway per cluster; no echo backends unless asked"
  }
  assert {
    condition     = yamldecode(output.compose_file).services["east-1"].depends_on["join-tokens"].condition == "service_completed_successfully"
    error_message = "gateways start after the one-shot join-tokens service"
  }
  assert {
    condition     = yamldecode(output.compose_file).services["east-1"].stop_signal == "SIGQUIT"
    error_message = "gateways drain on stop"
  }
  assert {
    condition     = strcontains(yamldecode(output.compose_file).services["join-tokens"].command[0], "for cluster in east-1 edge-1 west-1; do")
    error_message = "join-tokens makes a token for every cluster"
  }
  assert {
    condition     = contains(keys(yamldecode(output.compose_file).volumes), "edge-1-state")
    error_message = "a named state volume per gateway"
  }
}

run "compose_file_with_echo_backends" {
  command = plan
  variables {
    compose = { echo_backends = true }
  }

  assert {
    condition     = tolist(yamldecode(output.compose_file).services["echo-west-1"].command) == tolist(["west-1", "18301", "18302"])
    error_message = "an echo backend per exporting cluster, on its endpoints' ports"
  }
  assert {
    condition     = !contains(keys(yamldecode(output.compose_file).services), "echo-edge-1")
    error_message = "no echo backend for a cluster that exports nothing"
  }
}

run "kubernetes_manifests" {
  command = plan
  variables {
    kubernetes = { namespace = "mesh", federation_url = "https://federation.example:17443" }
  }

  assert {
    condition     = tolist([for m in output.kubernetes_manifests["east-1"] : m.kind]) == tolist(["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "Service"])
    error_message = "config, state, gateway, inbound service, imports service"
  }
  assert {
    condition     = tolist([for m in output.kubernetes_manifests["west-1"] : m.kind]) == tolist(["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"])
    error_message = "no imports service for a cluster that imports nothing"
  }
  assert {
    condition     = alltrue([for m in output.kubernetes_manifests["edge-1"] : m.metadata.namespace == "mesh"])
    error_message = "every manifest in the given namespace"
  }
  assert {
    condition     = yamldecode(output.kubernetes_manifests["east-1"][0].data["gateway.yaml"]).federation.url == "https://federation.example:17443"
    error_message = "pods dial the federation at kubernetes.federation_url"
  }
  assert {
    condition     = tolist([for v in output.kubernetes_manifests["east-1"][2].spec.template.spec.volumes : v.secret.secretName if can(v.secret)]) == tolist(["isthmus-join-token", "isthmus-federation-ca"])
    error_message = "the join token and the federation CA are Secret references"
  }
  assert {
    condition     = output.kubernetes_manifests["east-1"][2].spec.template.spec.securityContext.runAsUser == 10001
    error_message = "the gateway runs as the image's unprivileged user"
  }
}

run "kubernetes_federation_manifests" {
  command = plan

  assert {
    condition     = tolist([for m in output.kubernetes_federation_manifests : m.kind]) == tolist(["PersistentVolumeClaim", "Deployment", "Service"])
    error_message = "state, the federation, its API service"
  }
  assert {
    condition     = output.kubernetes_federation_manifests[2].spec.ports[0].port == 17443
    error_message = "the API service listens at federation.listen's port"
  }
  assert {
    condition     = contains(output.kubernetes_federation_manifests[1].spec.template.spec.containers[0].args, "127.0.0.1:17080")
    error_message = "the federation's admin listener stays on the pod's loopback"
  }
}
