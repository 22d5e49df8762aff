"""Country of a client address, from a configured table (for firewall rules).

The table maps two-letter country codes to prefixes (IPv4 and IPv6):

    countries:
      DE: [192.0.2.0/25, "2001:db8:de::/48"]
      FR: [192.0.2.128/25]

Lookups find the longest prefix containing the address: intervals sorted
by start, searched with bisect, per prefix length present (few lengths in
practice), longest first. Overlapping prefixes are fine: the most specific
wins. An address in no prefix has no country ("").
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Mapping, Sequence

CODE = re.compile(r"^[A-Z]{2}$")


class CountryTable:
    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        # (version, prefix length) -> sorted starts, their ends and codes
        by_len: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
        for code, prefixes in table.items():
            if not CODE.match(code):
                raise ValueError(f"countries: {code!r} is not a two-letter code like DE")
            for p in prefixes:
                try:
                    net = ipaddress.ip_network(p, strict=False)
                except ValueError:
                    raise ValueError(f"countries.{code}: {p!r} is not a prefix") from None
                by_len.setdefault((net.version, net.prefixlen), []).append(
                    (int(net.network_address), int(net.broadcast_address), code))
        self._levels = []
        for (version, _plen), rows in sorted(by_len.items(), key=lambda kv: -kv[0][1]):
            rows.sort()
            self._levels.append((version, [r[0] for r in rows], [r[1] for r in rows],
                                 [r[2] for r in rows]))

    def country(self, address: str) -> str:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return ""
        value = int(ip)
        for version, starts, ends, codes in self._levels:  # longest prefixes first
            if version != ip.version:
                continue
            i = bisect.bisect_right(starts, value) - 1
            if i >= 0 and value <= ends[i]:
                return codes[i]
        return ""
