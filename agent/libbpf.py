"""Thin ctypes binding to the system libbpf (Debian's libbpf1).

bcc compiles and loads our programs; everything that bcc's Python API does
not cover well (standalone inner maps, batch updates, pins, program test
runs, object info) goes through libbpf here. libbpf >= 1.0 returns -errno
directly, so every call checks the return value and raises BpfError with
the operation and a sentence for the errno.

No layout of our own maps lives here: see agent/abi.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from enum import IntEnum
from functools import cache

# -- kernel constants (uapi/linux/bpf.h) -------------------------------------


class MapType(IntEnum):
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    RINGBUF = 27


class ProgType(IntEnum):
    XDP = 6


BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_F_NO_PREALLOC = 1 << 0
BPF_F_INNER_MAP = 1 << 12

BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1

BPF_XDP = 37  # enum bpf_attach_type

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


class XdpAction(IntEnum):
    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


# -- libbpf structs (libbpf 1.1 bpf.h; each starts with its own size) ------


class _MapCreateOpts(ctypes.Structure):
    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    )


class _BatchOpts(ctypes.Structure):
    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class _TestRunOpts(ctypes.Structure):
    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    )


class _MapInfo(ctypes.Structure):  # struct bpf_map_info, up to map_extra
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    )


class _ProgInfo(ctypes.Structure):  # struct bpf_prog_info, up to run_cnt
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
    )


# -- errors --------------------------------------------------------------------

_ERRNO_SENTENCES = {
    errno.E2BIG: "the map is full",
    errno.ENOENT: "no such entry or object",
    errno.EEXIST: "the entry already exists",
    errno.EPERM: "not permitted (run as root, with CAP_BPF and CAP_NET_ADMIN)",
    errno.EACCES: "the verifier or the kernel refused access",
    errno.EINVAL: "the kernel rejected the arguments",
    errno.ENOMEM: "the kernel is out of memory for this map",
    errno.ENOTSUP: "the kernel does not support this operation",
    errno.EOPNOTSUPP: "the kernel does not support this operation",
    errno.EBUSY: "the object is busy (another program is attached?)",
}


class BpfError(OSError):
    """A libbpf call failed; the message names the operation and the errno."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        sentence = _ERRNO_SENTENCES.get(err, os.strerror(err))
        text = f"{op}: {sentence} ({errno.errorcode.get(err, err)})"
        if detail:
            text += f"; {detail}"
        super().__init__(err, text)
        self.op = op

    def __str__(self) -> str:
        return self.strerror or ""


# -- library -------------------------------------------------------------------


@cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise BpfError("load libbpf", errno.ENOENT, f"install libbpf1 ({e})") from e
    c_int, c_uint32, vp = ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p
    sigs = {
        "bpf_map_create": (c_int, [c_int, ctypes.c_char_p, c_uint32, c_uint32, c_uint32, vp]),
        "bpf_map_update_elem": (c_int, [c_int, vp, vp, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (c_int, [c_int, vp, vp]),
        "bpf_map_delete_elem": (c_int, [c_int, vp]),
        "bpf_map_get_next_key": (c_int, [c_int, vp, vp]),
        "bpf_map_update_batch": (c_int, [c_int, vp, vp, ctypes.POINTER(c_uint32), vp]),
        "bpf_map_lookup_batch": (c_int, [c_int, vp, vp, vp, vp, ctypes.POINTER(c_uint32), vp]),
        "bpf_obj_pin": (c_int, [c_int, ctypes.c_char_p]),
        "bpf_obj_get": (c_int, [ctypes.c_char_p]),
        "bpf_obj_get_info_by_fd": (c_int, [c_int, vp, ctypes.POINTER(c_uint32)]),
        "bpf_map_get_fd_by_id": (c_int, [c_uint32]),
        "bpf_prog_test_run_opts": (c_int, [c_int, vp]),
        "libbpf_num_possible_cpus": (c_int, []),
    }
    for fname, (restype, argtypes) in sigs.items():
        fn = getattr(lib, fname)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _check(op: str, rc: int, detail: str = "") -> int:
    if rc < 0:
        raise BpfError(op, -rc, detail)
    return rc


def _cbuf(data):
    """A ctypes-addressable object holding `data` (bytes are copied).

    Callers keep the result in a local so it outlives the libbpf call.
    """
    if isinstance(data, bytes | bytearray):
        return ctypes.create_string_buffer(bytes(data), len(data))
    return data


def _addr(obj) -> int:
    if hasattr(obj, "dtype"):  # numpy array
        return obj.ctypes.data
    return ctypes.addressof(obj)


def possible_cpus() -> int:
    return _check("count possible CPUs", _lib().libbpf_num_possible_cpus())


# -- maps ----------------------------------------------------------------------


def map_create(
    map_type: MapType,
    name: str,
    key_size: int,
    value_size: int,
    max_entries: int,
    flags: int = 0,
    inner_map_fd: int = 0,
) -> int:
    """Create a map and return its fd (caller owns it)."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags,
                          inner_map_fd=inner_map_fd)
    rc = _lib().bpf_map_create(int(map_type), name.encode()[:15], key_size, value_size,
                               max_entries, ctypes.byref(opts))
    return _check(f"create map {name} ({map_type.name}, {max_entries} entries)", rc)


def map_update(fd: int, key, value, flags: int = BPF_ANY, what: str = "map") -> None:
    k, v = _cbuf(key), _cbuf(value)
    _check(f"update {what}", _lib().bpf_map_update_elem(fd, _addr(k), _addr(v), flags))


def map_lookup(fd: int, key, value_size: int, what: str = "map") -> bytes | None:
    k, out = _cbuf(key), ctypes.create_string_buffer(value_size)
    rc = _lib().bpf_map_lookup_elem(fd, _addr(k), out)
    if rc == -errno.ENOENT:
        return None
    _check(f"look up {what}", rc)
    return out.raw


def map_delete(fd: int, key, what: str = "map") -> bool:
    """Delete one entry; False when it was not there."""
    k = _cbuf(key)
    rc = _lib().bpf_map_delete_elem(fd, _addr(k))
    if rc == -errno.ENOENT:
        return False
    _check(f"delete from {what}", rc)
    return True


def map_keys(fd: int, key_size: int, what: str = "map") -> list[bytes]:
    """All keys, by get_next_key (fine for the small maps we walk this way)."""
    keys: list[bytes] = []
    cur = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        rc = _lib().bpf_map_get_next_key(fd, cur, nxt)
        if rc == -errno.ENOENT:
            return keys
        _check(f"walk {what}", rc)
        keys.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)


def map_update_batch(fd: int, keys, values, count: int, what: str = "map") -> None:
    """Write `count` packed keys and values in one syscall loop.

    The kernel may stop early (E2BIG on a full map); the error then says how
    many entries it had written, so the caller can discard the map.
    """
    if count == 0:
        return
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
    n = ctypes.c_uint32(count)
    k, v = _cbuf(keys), _cbuf(values)
    rc = _lib().bpf_map_update_batch(fd, _addr(k), _addr(v), ctypes.byref(n),
                                     ctypes.byref(opts))
    _check(f"batch update {what}", rc, f"{n.value} of {count} written")


def map_lookup_all(fd: int, key_size: int, value_size: int, max_entries: int,
                   what: str = "map") -> tuple[bytes, bytes, int]:
    """Read a whole map with batch lookups: (packed keys, packed values, count)."""
    keys = ctypes.create_string_buffer(key_size * max_entries)
    values = ctypes.create_string_buffer(value_size * max_entries)
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
    total = 0
    in_batch = None
    out_batch = ctypes.create_string_buffer(max(key_size, 8))
    while total < max_entries:
        n = ctypes.c_uint32(max_entries - total)
        rc = _lib().bpf_map_lookup_batch(
            fd, in_batch, out_batch,
            ctypes.byref(keys, total * key_size), ctypes.byref(values, total * value_size),
            ctypes.byref(n), ctypes.byref(opts))
        total += n.value
        if rc == -errno.ENOENT:
            break
        _check(f"batch lookup {what}", rc)
        in_batch = ctypes.create_string_buffer(out_batch.raw, len(out_batch))
    return keys.raw[: total * key_size], values.raw[: total * value_size], total


# -- objects -------------------------------------------------------------------


def obj_pin(fd: int, path: str) -> None:
    _check(f"pin {path}", _lib().bpf_obj_pin(fd, path.encode()))


def obj_get(path: str) -> int:
    return _check(f"open pinned {path}", _lib().bpf_obj_get(path.encode()))


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str
    run_time_ns: int
    run_cnt: int


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    _check("read map info", _lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)))
    return MapInfo(info.id, info.type, info.key_size, info.value_size, info.max_entries,
                   info.map_flags, info.name.decode())


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    _check("read program info",
           _lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)))
    return ProgInfo(info.id, info.type, info.name.decode(), bytes(info.tag).hex(),
                    info.run_time_ns, info.run_cnt)


def map_fd_by_id(map_id: int) -> int:
    return _check(f"open map id {map_id}", _lib().bpf_map_get_fd_by_id(map_id))


# -- program test runs -----------------------------------------------------------


@dataclass(frozen=True)
class TestRun:
    retval: int
    data: bytes
    duration_ns: int  # mean per repetition, as the kernel reports it


class XdpMd(ctypes.Structure):
    """struct xdp_md as a test run's context: says which device received it."""

    _fields_ = (
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    )


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, flags: int = 0,
                  cpu: int = 0, batch_size: int = 0, out_size: int = 0,
                  ingress_ifindex: int = 0) -> TestRun:
    """Run a program on `data` with BPF_PROG_TEST_RUN.

    `ingress_ifindex` makes the frame arrive on that device of the caller's
    namespace (with live frames, XDP_TX then sends out of it); otherwise
    it arrives on loopback. Frames under 14 bytes make the kernel answer
    EINVAL for XDP; we say so.
    """
    data_in = ctypes.create_string_buffer(data, len(data))
    out_len = out_size or len(data) + 512
    data_out = ctypes.create_string_buffer(out_len)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_size_in=len(data),
        repeat=repeat, flags=flags, cpu=cpu, batch_size=batch_size,
    )
    if not flags & BPF_F_TEST_XDP_LIVE_FRAMES:
        opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
        opts.data_size_out = out_len
    ctx = XdpMd(data_end=len(data), ingress_ifindex=ingress_ifindex)
    if ingress_ifindex:
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    detail = "XDP frames must be at least 14 bytes" if len(data) < 14 else ""
    _check("test run", _lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), detail)
    return TestRun(opts.retval, data_out.raw[: opts.data_size_out], opts.duration)
