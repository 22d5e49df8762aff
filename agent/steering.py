"""Compile the steering config into one generation's steering maps.

Pure numpy, no kernel. The shapes come from bpf/include/pe_abi.h:

  steer   this DC on this link: flags (steer on internet links, decap on
          backbone links), region index, backbone address and ifindex
  dcs     DC number -> backbone address and region
  svc4/6  Regional Services dedicated IP -> region index
  maglev  per region, `slots` one-byte DC numbers: the Maglev table of
          every DC of the region (agent/maglev.py), with the slots of
          drained DCs (enabled: false) handed to the others (drain()), so
          draining a DC moves only its own flows and enabling it again
          brings back the very same table; EMPTY when no DC is enabled;
          packed 8 to a u64 map value (array values are 8-byte aligned)

Region indices are the sorted region names; DC numbers are positions in
the config's DC list. Both are private to one generation of one node.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np

from agent import abi, maglev
from agent.config import Steering


@dataclass
class SteerTables:
    params: abi.Steer
    dcs: np.ndarray         # DC_DTYPE[DCS_MAX]
    svc4_keys: np.ndarray   # >u4 addresses
    svc4_vals: np.ndarray   # SVC_DTYPE
    svc6_keys: np.ndarray   # ADDR6_DTYPE
    svc6_vals: np.ndarray
    maglev: np.ndarray      # uint8[REGIONS_MAX * slots], padded to whole u64 words

    @property
    def counts(self) -> dict[str, int]:
        return {"services": len(self.svc4_keys) + len(self.svc6_keys),
                "dcs": int((self.dcs["bb_addr4"] != 0).sum())}


def _v4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def drain(table: np.ndarray, names: list[str], enabled: list[bool], size: int) -> np.ndarray:
    """Hand the slots of disabled names to the enabled ones, moving nothing else.

    `table` is maglev.build(names, size). The enabled names take turns, in
    name order, each claiming the first slot of its own Maglev preference
    list that was vacated and is still unclaimed, until none is left: the
    vacated slots are shared evenly and every other slot keeps its owner.
    A function of (names, enabled), so re-enabling restores `table`.
    """
    alive = sorted((i for i in range(len(names)) if enabled[i]), key=names.__getitem__)
    if not alive:
        return np.full(size, maglev.EMPTY, np.uint32)
    vacated = ~np.asarray(enabled, bool)[table]
    if not vacated.any():
        return table
    out = table.copy()
    j = np.arange(size, dtype=np.int64)
    prefs = []
    for i in alive:
        offset, skip = maglev.permutation_params(names[i], size)
        perm = (offset + j * skip) % size
        prefs.append(perm[vacated[perm]].tolist())  # vacated slots, most preferred first
    claimed = np.zeros(size, bool)
    left = int(vacated.sum())
    pos = [0] * len(alive)
    while left:
        for k, i in enumerate(alive):
            pref, p = prefs[k], pos[k]
            while claimed[pref[p]]:
                p += 1
            claimed[pref[p]] = True
            out[pref[p]] = i
            pos[k] = p + 1
            left -= 1
            if not left:
                break
    return out


def region_tables(cfg: Steering, slots: int) -> dict[str, np.ndarray]:
    """Each region's table of DC numbers (drained DCs hold no slot)."""
    out = {}
    for region in cfg.regions:
        members = [i for i, d in enumerate(cfg.dcs) if d.region == region]
        if not any(cfg.dcs[i].enabled for i in members):
            out[region] = np.full(slots, abi.MAGLEV_EMPTY, np.uint8)
            continue
        names = [cfg.dcs[i].name for i in members]
        table = drain(maglev.build(names, slots), names,
                      [cfg.dcs[i].enabled for i in members], slots)
        out[region] = np.array(members, np.uint8)[table]
    return out


def compile_steering(cfg: Steering | None, public: bool, backbone_ifindex: int,
                     slots: int) -> SteerTables:
    """The steering maps; with no steering config, a generation that steers nothing."""
    dcs = np.zeros(abi.DCS_MAX, abi.DC_DTYPE)
    words = -(-abi.REGIONS_MAX * slots // abi.MAGLEV_PER_WORD)
    table = np.full(words * abi.MAGLEV_PER_WORD, abi.MAGLEV_EMPTY, np.uint8)
    empty4, empty6 = np.zeros(0, ">u4"), np.zeros(0, abi.ADDR6_DTYPE)
    if cfg is None:
        return SteerTables(abi.Steer(maglev_size=slots), dcs, empty4,
                           np.zeros(0, abi.SVC_DTYPE), empty6, np.zeros(0, abi.SVC_DTYPE),
                           table)
    index = {r: i for i, r in enumerate(cfg.regions)}
    for i, d in enumerate(cfg.dcs):
        dcs[i] = (_v4(d.backbone), index[d.region])
    for region, t in region_tables(cfg, slots).items():
        start = index[region] * slots
        table[start:start + slots] = t

    v4 = [s for s in cfg.services if ipaddress.ip_address(s.address).version == 4]
    v6 = [s for s in cfg.services if ipaddress.ip_address(s.address).version == 6]
    svc4_keys = np.array([_v4(s.address) for s in v4], ">u4")
    svc6_keys = np.zeros(len(v6), abi.ADDR6_DTYPE)
    for i, s in enumerate(v6):
        svc6_keys[i]["addr"] = np.frombuffer(ipaddress.IPv6Address(s.address).packed, np.uint8)

    def vals(services) -> np.ndarray:
        out = np.zeros(len(services), abi.SVC_DTYPE)
        out["region"] = [index[s.region] for s in services]
        return out

    params = abi.Steer(
        flags=abi.S_STEER if public else abi.S_DECAP,
        region=index[cfg.region],
        bb_ifindex=backbone_ifindex,
        maglev_size=slots,
    )
    params.bb_addr4[:] = ipaddress.IPv4Address(cfg.backbone_address).packed
    return SteerTables(params, dcs, svc4_keys, vals(v4), svc6_keys, vals(v6), table)
