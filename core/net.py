"""A network probe shared by the launch-time checks of tracking servers and teacher weight downloads."""
from __future__ import annotations

import socket
from urllib.parse import urlsplit


def reachable(url: str, timeout: float) -> str | None:
    """None if a TCP connection to the URL's host opens within `timeout` s (name lookup included), else
    why not. A quick probe before a client whose own retries take minutes to give up (MLflow's HTTP)."""
    from concurrent.futures import ThreadPoolExecutor, TimeoutError
    parts = urlsplit(url)
    default = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
    host, port = parts.hostname, parts.port or default.get(parts.scheme.split("+")[0], 443)
    if not host:
        return "the URI names no host"
    pool = ThreadPoolExecutor(1)
    try:
        pool.submit(lambda: socket.create_connection((host, port), timeout=timeout).close()).result(timeout)
        return None
    except TimeoutError:
        return f"{host}:{port} did not answer within {timeout:g} s"
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or e})"
    finally:
        pool.shutdown(wait=False)
