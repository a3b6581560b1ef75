"""`agent.toml`, the device agent's configuration (tomllib, standard library). Paths are relative to the file.

    server = "http://fleet:8080"
    token_file = "/etc/zoedge/token"     # or token = "zd_..."
    bundle = "bundle"                    # the bundle directory; pulled from the server when absent (bundle_id)
    bundle_id = "..."                    # optional when `bundle` exists
    data = "inbox"                       # labelled data: a folder of .tsv/.csv/.jsonl files, or one file
    eval = "dev.tsv"                     # optional held-out data (the trainer's --eval)
    state_dir = "state"                  # status.json, the lock, runs, pulled patches, the outbox
    interval = 300                       # seconds between cycles
    format = "trajectory"                # push format: trajectory | adapter | coefficients (train.seed_pool)
    train_seconds = 600                  # time budget of one cycle's training (0 = none); the run resumes next cycle
    min_examples = 8                     # train only with at least this many labelled examples
    train_lock = ""                      # a lock file shared by agents that must never train at the same time

    [train]                              # any `zoedge train` setting (TrainConfig field), e.g.
    steps = 200
    max_memory = "400MB"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from zoedge.errors import ZoedgeError
from zoedge.runtime.config import TrainConfig

FORMATS = ("trajectory", "adapter", "coefficients")


@dataclass
class AgentConfig:
    server: str
    bundle: Path
    data: Path
    state_dir: Path
    token: str = ""
    token_file: Path | None = None
    bundle_id: str = ""
    eval: Path | None = None
    interval: float = 300.0
    format: str = "trajectory"
    train_seconds: float = 0.0
    min_examples: int = 8
    train_lock: Path | None = None
    train: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None  # the config file

    def train_config(self, **overrides: Any) -> TrainConfig:
        return TrainConfig(**{**self.train, **overrides})

    @property
    def lock_path(self) -> Path:
        return self.train_lock or self.state_dir / "train.lock"

    def read_token(self) -> str:
        if self.token:
            return self.token
        try:
            return self.token_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ZoedgeError(f"{self.source}: token_file {self.token_file}: {e.strerror or e}") from None


PATHS = ("bundle", "data", "state_dir", "token_file", "eval", "train_lock")
NUMBERS = {"interval": float, "train_seconds": float, "min_examples": int}


def load_config(path: str | Path) -> AgentConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ZoedgeError(f"{path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ZoedgeError(f"{path}: not valid TOML ({e})") from None
    known = {f.name for f in fields(AgentConfig)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ZoedgeError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    for name in ("server", "bundle", "data", "state_dir"):
        if not isinstance(raw.get(name), str) or not raw[name]:
            raise ZoedgeError(f"{path}: {name!r} is required (a string)")
    if not raw.get("token") and not raw.get("token_file"):
        raise ZoedgeError(f"{path}: give 'token' or 'token_file' (the device's token from `zoedge device register`)")
    for name in ("token", "token_file", "bundle_id", "eval", "train_lock", "format"):
        if name in raw and not isinstance(raw[name], str):
            raise ZoedgeError(f"{path}: {name!r} must be a string")
    for name, kind in NUMBERS.items():
        if name in raw:
            v = raw[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (kind is int and v != int(v)):
                raise ZoedgeError(f"{path}: {name!r} must be a non-negative {'integer' if kind is int else 'number'}")
            raw[name] = kind(v)
    if raw.get("format", "trajectory") not in FORMATS:
        raise ZoedgeError(f"{path}: format must be one of {', '.join(FORMATS)}")
    train = raw.get("train", {})
    if not isinstance(train, dict):
        raise ZoedgeError(f"{path}: [train] must be a table of `zoedge train` settings")
    train_fields = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(train) - train_fields)
    if bad:
        raise ZoedgeError(f"{path}: [train] has no setting {bad[0]!r} (known: {', '.join(sorted(train_fields))})")
    base = path.parent
    for name in PATHS:
        if raw.get(name):
            raw[name] = (base / Path(raw[name]).expanduser()).resolve()
        else:
            raw.pop(name, None)
    return AgentConfig(**raw, source=path)
