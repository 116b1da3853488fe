# The demo's topology (isthmus/demo.py, with its ports + 50) through the module: what it renders
# is what compose/demo.yaml and compose/demo/*/ hold (tests/deploy/test_terraform.py checks that
# they say the same), plus Kubernetes manifests for the same clusters.
#   terraform -chdir=terraform/demo init && terraform -chdir=terraform/demo apply
#   python3 terraform/render.py terraform/demo OUT    # the files, under OUT
module "isthmus" {
  source = "../modules/isthmus"

  federation = { listen = "127.0.0.1:17493", admin = "127.0.0.1:17130", lease_ttl = "3s" }

  clusters = {
    east-1 = { region = "us-east", zone = "a", inbound = "127.0.0.1:15151", admin = "127.0.0.1:15152" }
    east-2 = { region = "us-east", zone = "b", inbound = "127.0.0.1:15251", admin = "127.0.0.1:15252" }
    west-1 = { region = "us-west", zone = "a", inbound = "127.0.0.1:15351", admin = "127.0.0.1:15352" }
    edge-1 = { region = "eu-west", zone = "a", inbound = "127.0.0.1:15451", admin = "127.0.0.1:15452" }
  }

  services = {
    echo = {
      port = 8080
      endpoints = {
        east-1 = ["127.0.0.1:18151", "127.0.0.1:18152"]
        east-2 = ["127.0.0.1:18251", "127.0.0.1:18252"]
        west-1 = ["127.0.0.1:18351", "127.0.0.1:18352"]
      }
      imports = {
        east-1 = { listen = "127.0.0.1:16151" }
        east-2 = { listen = "127.0.0.1:16251" }
        west-1 = { listen = "127.0.0.1:16351" }
        edge-1 = { listen = "127.0.0.1:16451", policy = "prefer-us-east" } # consumer only
      }
      health_check = { interval = "300ms", timeout = "200ms", healthy_threshold = 2, unhealthy_threshold = 2 }
    }
  }
  policies = {
    default        = { failback_after = "2s" }
    prefer-us-east = { region_preference = ["us-east", "us-west"], failback_after = "2s" }
  }

  gateway_settings = {
    limits            = { connect_timeout = "500ms", drain_timeout = "5s" }
    outlier_detection = { consecutive_failures = 1, base_ejection = "2s", max_ejection = "30s" }
    peer_probe        = { interval = "300ms", timeout = "300ms" }
    policy            = { import_listen = ["127.0.0.0/8"] }
  }

  compose = { name = "isthmus-demo", config_dir = "./demo", echo_backends = true }
}

output "gateway_files" { value = module.isthmus.gateway_files }
output "service_files" { value = module.isthmus.service_files }
output "compose_file" { value = module.isthmus.compose_file }
output "compose_config_dir" { value = module.isthmus.compose_config_dir }
output "kubernetes_yaml" { value = module.isthmus.kubernetes_yaml }
output "kubernetes_federation_yaml" { value = module.isthmus.kubernetes_federation_yaml }
