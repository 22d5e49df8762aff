"""The Python mirror of bpf/include/pe_abi.h: the only layouts in Python.

Every ctypes Structure and IntEnum here has its C twin in pe_abi.h.
tests/unit/test_abi.py compiles a probe with gcc and proves sizes, offsets,
enum values and constants equal; the loader compares map key and value sizes
at load time. Nothing else in Python declares a layout: import from here.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum

import numpy as np

u8, u32, u64 = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint64

# -- constants (C macro name -> value, checked by the probe) ------------------

LAYOUT_VERSION = 1
REASON_MAX = 64
VLAN_MAX = 2
IPV6_EXT_MAX = 6
GEN_SLOTS = 2
F_BOGONS = 1 << 0
SUM_BITS = 2
SUM_WORD_SHIFT = 13
SUM_WORDS = 1 << 19
EXACT_SLOTS = 16
EXACT_MUL1 = 0x9E3779B1
EXACT_MUL2 = 0x85EBCA77
EXACT_XOR2 = 0x5BD1E995
EXACT_MIN_SHIFT = 6
EXACT_MAX_SHIFT = 26
L4_RULES_MAX = 32
L4_PORTS = 65536
REGIONS_MAX = 16
DCS_MAX = 255
MAGLEV_EMPTY = 0xFF
MAGLEV_PER_WORD = 8
TUNNEL_TTL = 64
FLOW_SEED = 0x5E2D58D8
S_STEER = 1 << 0
S_DECAP = 1 << 1

C_CONSTANTS = {
    "PE_LAYOUT_VERSION": LAYOUT_VERSION,
    "PE_REASON_MAX": REASON_MAX,
    "PE_VLAN_MAX": VLAN_MAX,
    "PE_IPV6_EXT_MAX": IPV6_EXT_MAX,
    "PE_GEN_SLOTS": GEN_SLOTS,
    "PE_F_BOGONS": F_BOGONS,
    "PE_SUM_BITS": SUM_BITS,
    "PE_SUM_WORD_SHIFT": SUM_WORD_SHIFT,
    "PE_SUM_WORDS": SUM_WORDS,
    "PE_EXACT_SLOTS": EXACT_SLOTS,
    "PE_EXACT_MUL1": EXACT_MUL1,
    "PE_EXACT_MUL2": EXACT_MUL2,
    "PE_EXACT_XOR2": EXACT_XOR2,
    "PE_EXACT_MIN_SHIFT": EXACT_MIN_SHIFT,
    "PE_EXACT_MAX_SHIFT": EXACT_MAX_SHIFT,
    "PE_L4_RULES_MAX": L4_RULES_MAX,
    "PE_L4_PORTS": L4_PORTS,
    "PE_REGIONS_MAX": REGIONS_MAX,
    "PE_DCS_MAX": DCS_MAX,
    "PE_MAGLEV_EMPTY": MAGLEV_EMPTY,
    "PE_MAGLEV_PER_WORD": MAGLEV_PER_WORD,
    "PE_TUNNEL_TTL": TUNNEL_TTL,
    "PE_FLOW_SEED": FLOW_SEED,
    "PE_S_STEER": S_STEER,
    "PE_S_DECAP": S_DECAP,
}

# -- enums (each names its C prefix) ---------------------------------------------


class Reason(IntEnum):
    """enum pe_reason: append only; the verdict is in the name."""

    PASS = 0
    PASS_ALLOW = 1
    PASS_NOT_IP = 2
    PASS_FRAGMENT = 3
    PASS_NO_RULES = 4
    PASS_NO_PROGRAM = 5
    DROP_TRUNCATED = 6
    DROP_BAD_IHL = 7
    DROP_BAD_LENGTH = 8
    DROP_BAD_VERSION = 9
    DROP_VLAN_DEPTH = 10
    DROP_EXTHDR_DEPTH = 11
    DROP_BAD_EXTHDR = 12
    DROP_BAD_FRAGMENT = 13
    DROP_BAD_L4 = 14
    DROP_DENYLIST = 15
    DROP_BOGON = 16
    DROP_L4_RULE = 17
    DROP_RATE_SYN = 18
    DROP_RATE_UDP = 19
    PASS_DECAP = 20
    PASS_IN_REGION = 21
    REDIRECT_STEER = 22
    DROP_NO_REGION_DC = 23
    DROP_STEER_FAIL = 24
    DROP_TOO_BIG = 25
    DROP_BAD_TUNNEL = 26
    DROP_TUNNEL_DEST = 27

    @property
    def verdict(self) -> str:
        """"PASS", "DROP" or "REDIRECT", from the name (as the masks in C)."""
        return self.name.split("_", 1)[0]

    @property
    def label(self) -> str:
        """The metric/CLI label: lower case without the verdict."""
        rest = self.name.split("_", 1)
        return rest[1].lower() if len(rest) > 1 else "ok"


DROP_REASONS_MASK = sum(1 << r for r in Reason if r.verdict == "DROP")
REDIRECT_REASONS_MASK = sum(1 << r for r in Reason if r.verdict == "REDIRECT")


class SumState(IntEnum):
    """enum pe_sum_state: what the /24 summary says about a source."""

    CLEAN = 0
    DENY = 1
    EXACT = 2
    SLOW = 3




class L4Class(IntEnum):
    TCP = 0
    UDP = 1
    OTHER = 2




class RlKind(IntEnum):
    SYN = 1
    UDP = 2




class ProgSlot(IntEnum):
    EDGE = 0


PROG_SLOTS = 4  # PE_PROG__SLOTS
C_CONSTANTS["PE_PROG__SLOTS"] = PROG_SLOTS
C_CONSTANTS["PE_R__COUNT"] = len(Reason)
C_CONSTANTS["PE_L4__CLASSES"] = len(L4Class)

# Each enum's C spelling: prefix + member name.
ENUM_PREFIXES: dict[type[IntEnum], str] = {
    Reason: "PE_R_",
    SumState: "PE_SUM_",
    L4Class: "PE_L4_",
    RlKind: "PE_RL_",
    ProgSlot: "PE_PROG_",
}

# -- structs (each names its C struct) ------------------------------------------------


class Counter(ctypes.Structure):
    _c_name_ = "pe_counter"
    _fields_ = (("packets", u64), ("bytes", u64))


class Active(ctypes.Structure):
    _c_name_ = "pe_active"
    _fields_ = (("slot", u32), ("_pad", u32), ("generation", u64))


class Rate(ctypes.Structure):
    _c_name_ = "pe_rate"
    _fields_ = (("interval_ns", u64), ("burst_ns", u64))


class Params(ctypes.Structure):
    _c_name_ = "pe_params"
    _fields_ = (
        ("generation", u64),
        ("flags", u32),
        ("exact_shift", u32),
        ("l4_drop_rules", u32),
        ("_pad", u32),
        ("syn", Rate),
        ("udp", Rate),
    )


class ExactBucket(ctypes.Structure):
    _c_name_ = "pe_exact_bucket"
    _fields_ = (("slot", u32 * EXACT_SLOTS),)


class Lpm4Key(ctypes.Structure):
    _c_name_ = "pe_lpm4_key"
    _fields_ = (("prefixlen", u32), ("addr", u8 * 4))


class Lpm6Key(ctypes.Structure):
    _c_name_ = "pe_lpm6_key"
    _fields_ = (("prefixlen", u32), ("addr", u8 * 16))


class LpmVal(ctypes.Structure):
    _c_name_ = "pe_lpm_val"
    _fields_ = (("expires_ns", u64),)


class L4Ports(ctypes.Structure):
    _c_name_ = "pe_l4_ports"
    _fields_ = (("src_rules", u32), ("dst_rules", u32))


class RlKey(ctypes.Structure):
    _c_name_ = "pe_rl_key"
    _fields_ = (("addr", u8 * 16), ("kind", u32))


class RlVal(ctypes.Structure):
    _c_name_ = "pe_rl_val"
    _fields_ = (("tat_ns", u64),)


class Steer(ctypes.Structure):
    _c_name_ = "pe_steer"
    _fields_ = (
        ("flags", u32),
        ("region", u32),
        ("bb_addr4", u8 * 4),
        ("bb_ifindex", u32),
        ("maglev_size", u32),
        ("_pad", u32),
    )


class Dc(ctypes.Structure):
    _c_name_ = "pe_dc"
    _fields_ = (("bb_addr4", u8 * 4), ("region", u32))


class Svc(ctypes.Structure):
    _c_name_ = "pe_svc"
    _fields_ = (("region", u32), ("_pad", u32))


class Addr6(ctypes.Structure):
    _c_name_ = "pe_addr6"
    _fields_ = (("addr", u8 * 16),)


STRUCTS: tuple[type[ctypes.Structure], ...] = (
    Counter, Active, Rate, Params, ExactBucket, Lpm4Key, Lpm6Key, LpmVal, L4Ports,
    RlKey, RlVal, Steer, Dc, Svc, Addr6,
)

# -- numpy views of the same layouts, for bulk fills; the ABI test checks them ----------

LPM4_KEY_DTYPE = np.dtype([("prefixlen", "<u4"), ("addr", ">u4")])
LPM6_KEY_DTYPE = np.dtype([("prefixlen", "<u4"), ("hi", ">u8"), ("lo", ">u8")])
LPM_VAL_DTYPE = np.dtype([("expires_ns", "<u8")])
L4_PORTS_DTYPE = np.dtype([("src_rules", "<u4"), ("dst_rules", "<u4")])
DC_DTYPE = np.dtype([("bb_addr4", ">u4"), ("region", "<u4")])
SVC_DTYPE = np.dtype([("region", "<u4"), ("_pad", "<u4")])
ADDR6_DTYPE = np.dtype([("addr", "u1", (16,))])
NUMPY_VIEWS = {Lpm4Key: LPM4_KEY_DTYPE, Lpm6Key: LPM6_KEY_DTYPE, LpmVal: LPM_VAL_DTYPE,
               L4Ports: L4_PORTS_DTYPE, Dc: DC_DTYPE, Svc: SVC_DTYPE, Addr6: ADDR6_DTYPE}
