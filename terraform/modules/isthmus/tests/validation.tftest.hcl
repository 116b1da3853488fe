# Bad input is refused at plan time, naming the variable.
variables {
  federation = { listen = "127.0.0.1:17443", admin = "127.0.0.1:17080" }
  clusters = {
    east-1 = { region = "us-east", zone = "a", inbound = "127.0.0.1:15101", admin = "127.0.0.1:15102" }
  }
  services = {}
}

run "service_names_an_unknown_cluster" {
  command = plan
  variables {
    services = { echo = { port = 8080, endpoints = { north-9 = ["127.0.0.1:1"] } } }
  }
  expect_failures = [var.services]
}

run "import_names_an_unknown_policy" {
  command = plan
  variables {
    services = { echo = { port = 8080, imports = { east-1 = { listen = "127.0.0.1:16101", policy = "nope" } } } }
  }
  expect_failures = [var.services]
}

run "cluster_name_is_not_a_dns_label" {
  command = plan
  variables {
    clusters = { East_1 = { region = "us-east", zone = "a", inbound = "127.0.0.1:15101", admin = "127.0.0.1:15102" } }
  }
  expect_failures = [var.clusters]
}

run "address_without_a_port" {
  command = plan
  variables {
    clusters = { east-1 = { region = "us-east", zone = "a", inbound = "127.0.0.1", admin = "127.0.0.1:15102" } }
  }
  expect_failures = [var.clusters]
}

run "unknown_tier" {
  command = plan
  variables {
    policies = { default = { tiers = ["cluster", "planet"] } }
  }
  expect_failures = [var.policies]
}
