"""The image's HEALTHCHECK: GET the URL given as argument, else $ISTHMUS_HEALTH_URL, else
http://127.0.0.1:17080/healthz (the federation's admin default); exit 0 on HTTP 200, else 1
with one line saying why.

Every Isthmus process serves /healthz and /readyz on its admin listener; a compose service sets
ISTHMUS_HEALTH_URL to its own admin address, a Kubernetes probe passes the URL (the admin
listener stays on the pod's loopback). Standard library only (the image has no curl)."""

import os
import sys
import urllib.error
import urllib.request

URL = (sys.argv[1] if len(sys.argv) > 1
       else os.environ.get("ISTHMUS_HEALTH_URL", "http://127.0.0.1:17080/healthz"))

try:
    with urllib.request.urlopen(URL, timeout=2) as reply:
        sys.exit(0 if reply.status == 200 else 1)
except (OSError, urllib.error.URLError) as e:
    print(f"healthcheck: GET {URL}: {e}", file=sys.stderr)
    sys.exit(1)
