"""Transitional (one commit): the server's app.py was renamed to clusters.py; split next."""

import sys

from federation.server import clusters as _app

sys.modules[__name__ + ".app"] = _app
