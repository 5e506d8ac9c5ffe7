"""`python -m app.healthcheck`: exit 0 when this container's server answers /healthz.

The image's HEALTHCHECK; it reads ALEXNET_PORT like the server does and needs no curl."""

from __future__ import annotations

import sys
import urllib.request

from app.settings import Settings


def main() -> int:
    port = Settings().port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as r:
            return 0 if r.status == 200 else 1
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
