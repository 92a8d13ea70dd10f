"""moto's S3 server as a process of its own, so that the chaos benchmark can kill -9 it and start
it again on the same port. moto keeps its state in memory, so each start creates the bucket
again, on a staging port, before the served port listens (no moment without the bucket). With
BIND_AT (unix time), the served port opens then and not before: the benchmark starts the
replacement at once and the outage lasts as long as it says, however slowly Python starts here.

    python -m bench.moto_process PORT BUCKET [BIND_AT]
"""

from __future__ import annotations

import signal
import socket
import sys
import time


def serve(port: int, bucket: str, bind_at: float = 0.0) -> None:
    from moto.server import ThreadedMotoServer
    from tests.support.s3 import create_bucket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        staging_port = sock.getsockname()[1]
    staging = ThreadedMotoServer(ip_address="127.0.0.1", port=staging_port, verbose=False)
    staging.start()
    create_bucket(f"http://127.0.0.1:{staging_port}", bucket)  # the same backends serve both ports
    staging.stop()
    time.sleep(max(0.0, bind_at - time.time()))
    served = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    served.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
