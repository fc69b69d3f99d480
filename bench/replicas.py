"""Several fleetline ingest replicas as one process, for bench/ingest.py --ingest-replicas.

    python bench/replicas.py N

Replica i runs ``python -m fleetline_cli ingest`` with FLEETLINE_INGEST_CLIENT_ID suffixed
``-i`` and FLEETLINE_INGEST_HTTP_PORT from BENCH_REPLICA_PORTS (comma-separated); the
share group and everything else come from the environment. SIGTERM is passed on to
every replica; the exit code is the first non-zero one of theirs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any


def main() -> None:
    count = int(sys.argv[1])
    ports = os.environ["BENCH_REPLICA_PORTS"].split(",")
    base_id = os.environ["FLEETLINE_INGEST_CLIENT_ID"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fleetline_cli", "ingest"],
            env={**os.environ, "FLEETLINE_INGEST_CLIENT_ID": f"{base_id}-{i}",
                 "FLEETLINE_INGEST_HTTP_PORT": ports[i]},
        )
        for i in range(count)
    ]

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [p.wait() for p in procs]
    sys.exit(next((c for c in codes if c), 0))


if __name__ == "__main__":
    main()
