"""A site CA of a test's own (made with `gateway.common.pki`, as `egiz pki` makes it): the CA, server
certificates for this machine's loopback names, a client certificate, and a second, foreign CA."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.common.pki import init_ca, issue


@dataclass(frozen=True)
class SitePki:
    """Paths of the test PKI; `server`, `server2` and `client` are (certificate, key) pairs."""

    ca: Path
    server: tuple[Path, Path]  # CN=server, SANs localhost and 127.0.0.1
    server2: tuple[Path, Path]  # the same names, another key: what a renewed (or swapped) certificate is
    client: tuple[Path, Path]  # CN=gw-client, for client-certificate verification
    foreign_ca: Path  # a CA that signed none of the above
    foreign_server: tuple[Path, Path]  # signed by the foreign CA, for the same names


def make_site_pki(root: Path) -> SitePki:
    site, foreign = root / "site", root / "foreign"
    init_ca(site, "Test site CA")
    init_ca(foreign, "Someone else's CA")
    names = {"dns": ("localhost",), "ips": ("127.0.0.1",)}
    return SitePki(
        ca=site / "ca.crt",
        server=issue(site, "server", **names),  # type: ignore[arg-type]
        server2=issue(site, "server2", **names),  # type: ignore[arg-type]
        client=issue(site, "gw-client", kind="client"),
        foreign_ca=foreign / "ca.crt",
        foreign_server=issue(foreign, "server", **names),  # type: ignore[arg-type]
    )
