"""A network generation as it travels: the network config with its list
files carried inside, numbered and hashed.

    payload, net = pack(Path("network.yaml"), number=7)     # control plane
    gen = unpack(payload, Path("/var/lib/privedge/gen/7"))   # agent: files written, parsed

    {"number": 7,
     "sha256": "...",                  # of the canonical JSON of doc and files
     "doc": {...network config...},    # list files renamed lists/deny-0.txt, ...
     "files": {"lists/deny-0.txt": "192.0.2.0/24\\n..."}}

The control plane validates the file whole before packing, and the agent
validates again after unpacking (it trusts no sender to have checked): the
list files are written under the generation's own directory, whose names
the packer chose, so a document's lists never name a path on the agent.
(Other paths in it are the network's own settings, an origin's ca_file:
paths on every agent, which an admin sets.)
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from agent.config import ConfigError, read_yaml_mapping
from control.network import NetworkConfig, load_network, parse_network

LIST_NAME = re.compile(r"lists/(deny|allow)-[0-9]{1,4}\.txt")     # whole names (fullmatch)
MAX_GENERATION = 2**53 - 1        # exact in JSON numbers


def content_hash(doc: dict, files: dict[str, str]) -> str:
    canonical = json.dumps({"doc": doc, "files": files}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def pack(path: Path, number: int) -> tuple[dict, NetworkConfig]:
    """Validate `path` (ConfigError lists every problem) and pack it as
    generation `number`, each list file's text carried under a fixed name.
    Returns the payload and the validated config."""
    net = load_network(path)
    doc = copy.deepcopy(read_yaml_mapping(path))
    files: dict[str, str] = {}
    for kind in ("deny", "allow"):
        section = doc.get(kind) or {}
        names = []
        for i, f in enumerate(section.get("files") or ()):
            source = Path(f) if Path(f).is_absolute() else path.parent / f
            name = f"lists/{kind}-{i}.txt"
            try:
                with open(source, newline="", encoding="utf-8") as text:   # CRLF kept too
                    files[name] = text.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: {kind}.files[{i}]: {f!r}: {e}") from None
            names.append(name)
        if names:
            section["files"] = names
    doc = json.loads(json.dumps(doc))      # YAML's types to JSON's (dates, tuples)
    return {"number": number, "sha256": content_hash(doc, files), "doc": doc,
            "files": files}, net


@dataclass(frozen=True)
class Generation:
    number: int
    sha256: str
    net: NetworkConfig
    payload: dict          # as received: what the agent keeps and re-applies at start


def check_payload(payload: object) -> tuple[int, str, dict, dict[str, str]]:
    """The payload's shape; ConfigError naming what is wrong."""
    if not isinstance(payload, dict):
        raise ConfigError("generation: not a JSON object")
    number, sha, doc, files = (payload.get(k) for k in ("number", "sha256", "doc", "files"))
    if not isinstance(number, int) or isinstance(number, bool) \
            or not 1 <= number <= MAX_GENERATION:
        raise ConfigError(f"generation: number: {number!r}: a whole number from 1")
    if not isinstance(doc, dict):
        raise ConfigError("generation: doc: the network config, a JSON object")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in files.items()):
        raise ConfigError("generation: files: an object of file name -> text")
    bad = sorted(k for k in files if not LIST_NAME.fullmatch(k))
    if bad:
        raise ConfigError(f"generation: files: {bad[0]!r}: names are lists/deny-N.txt "
                          "or lists/allow-N.txt")
    if not isinstance(sha, str) or sha != content_hash(doc, files):
        raise ConfigError(f"generation {number}: sha256 {sha!r} is not the hash of its doc "
                          "and files (damaged or altered on the way)")
    return number, sha, doc, files


def unpack(payload: object, directory: Path) -> Generation:
    """Write the payload's list files under `directory` and validate its
    network config whole (ConfigError lists every problem)."""
    number, sha, doc, files = check_payload(payload)
    for kind in ("deny", "allow"):
        section = doc.get(kind)
        named = section.get("files") if isinstance(section, dict) else None
        for n in named if isinstance(named, list) else ():   # other shapes: the schema says
            if not isinstance(n, str) or n not in files or not n.startswith(f"lists/{kind}-"):
                raise ConfigError(f"generation {number}: {kind}.files: {n!r}: not a "
                                  f"{kind} list file the generation carries")
    for name, text in files.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    net = parse_network(doc, f"generation {number}", directory)
    return Generation(number, sha, net, payload)  # type: ignore[arg-type]
