"""The control plane's memory: every generation it has applied, numbered.

    store = GenerationStore(Path("generations"))
    payload = store.current()              # the network every DC should be at
    store.save(pack(path, store.next_number()))

    <dir>/7.json    a payload (control/genpack.py), written whole then renamed
    <dir>/current   "7": the generation every DC should be at

`privedge-net apply` saves a generation here before it sends it, so the
network's wanted state survives a DC that was down: `reconcile` and an
agent's pull at start (control/genserver.py) bring it there.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from agent.config import ConfigError
from control.genpack import Generation, check_payload, unpack
from control.network import Dc
from control.pki import write_file

CURRENT = "current"


class GenerationStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def numbers(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(p.stem) for p in self.directory.glob("*.json") if p.stem.isdigit())

    def next_number(self) -> int:
        """One above every generation ever saved, so a number is never reused."""
        return max(self.numbers(), default=0) + 1

    def current_number(self) -> int | None:
        try:
            text = (self.directory / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise ConfigError(f"{self.directory / CURRENT}: {text!r} is not a generation number")
        return int(text)

    def get(self, number: int) -> dict:
        path = self.directory / f"{number}.json"
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: generation {number} does not load: {e}") from None
        if check_payload(payload)[0] != number:   # and not altered since it was saved
            raise ConfigError(f"{path} holds generation {payload['number']}, not {number}")
        return payload

    def current(self) -> dict | None:
        number = self.current_number()
        return None if number is None else self.get(number)

    def set_current(self, number: int | None) -> None:
        """Point `current` at a kept generation, or at none (back, after every
        DC refused the newest)."""
        if number is None:
            (self.directory / CURRENT).unlink(missing_ok=True)
            return
        self.get(number)
        write_file(self.directory / CURRENT, f"{number}\n".encode(), 0o600)

    def save(self, payload: dict) -> None:
        """Keep `payload` and make it current (each file replaced atomically)."""
        number = check_payload(payload)[0]
        if number in self.numbers():
            raise ConfigError(f"generation {number} exists already in {self.directory}")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_file(self.directory / f"{number}.json", json.dumps(payload).encode(), 0o600)
        write_file(self.directory / CURRENT, f"{number}\n".encode(), 0o600)


def dc_addresses(payload: dict) -> dict[str, str]:
    """Where each DC of a stored generation is (its backbone address), from
    its `dcs` section alone: no list is unpacked to reach the DCs."""
    try:
        return {name: Dc.model_validate(dc).backbone for name, dc in payload["doc"]["dcs"].items()}
    except (KeyError, AttributeError, ValidationError) as e:
        raise ConfigError(f"generation {payload.get('number')}: dcs: {e}") from None


@dataclass
class Opened:
    """A stored generation unpacked in a temporary directory (its list files
    are read from there by control/render.py); close() removes it."""

    generation: Generation
    directory: tempfile.TemporaryDirectory

    @property
    def base(self) -> Path:
        return Path(self.directory.name)

    def close(self) -> None:
        self.directory.cleanup()


def open_payload(payload: dict) -> Opened:
    tmp = tempfile.TemporaryDirectory(prefix="privedge-gen-")
    try:
        return Opened(unpack(payload, Path(tmp.name)), tmp)
    except BaseException:
        tmp.cleanup()
        raise
