"""The gateway's DNS responder alone, for bench/dns.py: `python -m bench.dns_server PORT N ZONE`.

Serves, on 127.0.0.1:PORT (UDP and TCP), the records a gateway importing N services (svc-0 ..
svc-N-1 in namespace bench, each exported by one live cluster) answers: the same DnsResponder
and answers.build the gateway runs, on uvloop, with no catalog changes during the run. Writes
the zone file an authoritative server needs to serve exactly the same records to ZONE, prints
"ready" and runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import uvloop

from federation.model import Catalog, ClusterRecord, Endpoint, Export, FailoverPolicy
from gateway.config.values import ImportConfig
from gateway.dns.answers import DnsSettings, Records, build
from gateway.dns.responder import DnsResponder

ME = "bench-1"


def records(n: int) -> Records:
    peer = ClusterRecord("bench-2", "r2", "a", "bench-2.isthmus.local", "127.0.0.1:1")
    exports = [Export("bench-2", "bench", f"svc-{i}", 8080, "tcp",
                      (Endpoint("127.0.0.1", 9000, True, 1),), None) for i in range(n)]
    cat = Catalog(revision=1, clusters={"bench-2": peer}, live=frozenset({"bench-2"}),
                  exports={e.key: e for e in exports})
    imports = [ImportConfig(f"svc-{i}", "bench", ("127.0.0.1", 20000 + i), FailoverPolicy())
               for i in range(n)]
    return build(DnsSettings(), imports, cat, ME, 1)


def zone_text(r: Records) -> str:
    """Every record of `r` as a master file (RFC 1035), the SOA first."""
    lines = [f"$ORIGIN {r.zone}", f"$TTL {r.ttl}"]
    for name in sorted(r.names, key=lambda x: (x != r.zone, x)):
        for rdtype, rdatas in sorted(r.names[name].items(), key=lambda kv: kv[0] != 6):
            rr = r.rrset(name, rdtype, rdatas)
            lines += rr.to_text().splitlines()
    return "\n".join(lines) + "\n"


async def main(port: int, n: int, zone_file: Path) -> None:
    recs = records(n)
    zone_file.write_text(zone_text(recs))
    server = DnsResponder(recs)
    await server.start("127.0.0.1", port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.close()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])))
