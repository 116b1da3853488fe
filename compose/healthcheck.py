"""The image's HEALTHCHECK: GET $ISTHMUS_HEALTH_URL (default http://127.0.0.1:17080/healthz,
the federation's admin default); exit 0 on HTTP 200, else 1 with one line saying why.

Every Isthmus process serves /healthz on its admin listener; a compose service or a
testcontainers test sets ISTHMUS_HEALTH_URL to its own admin address. Standard library only
(the image has no curl)."""

import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("ISTHMUS_HEALTH_URL", "http://127.0.0.1:17080/healthz")

try:
    with urllib.request.urlopen(URL, timeout=2) as reply:
        sys.exit(0 if reply.status == 200 else 1)
except (OSError, urllib.error.URLError) as e:
    print(f"healthcheck: GET {URL}: {e}", file=sys.stderr)
    sys.exit(1)
