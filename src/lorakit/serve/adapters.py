"""The adapters a server holds: public names, versions, locks, LRU eviction and hot reload.

Each load gets a fresh internal name (`name@N`). The public name switches to it in one assignment,
so a request sees either the old version or the new one. A version is deleted from the model only
when no in-flight request still uses it. A broken or half-written adapter never replaces a working
one: its error is recorded and shown in /v1/models.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any


log = logging.getLogger("lorakit.serve")


@dataclass
class Version:
    internal: str
    path: Path
    fingerprint: str
    users: int = 0
    retired: bool = False


def fingerprint(path: Path) -> str:
    """Changes whenever the adapter's files change (size and mtime of its config and weights)."""
    parts = []
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        f = path / name
        st = f.stat() if f.exists() else None
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}" if st else f"{name}:-")
    return "|".join(parts)


class Registry:
    def __init__(self, base_model: Any, model_lock: threading.Lock, allowed_dir: Path | None = None,
                 max_adapters: int | None = None):
        self.net = base_model  # becomes a PeftModel at the first load
        self.model_lock = model_lock
        self.allowed_dir = allowed_dir.resolve() if allowed_dir else None
        self.max_adapters = max_adapters
        self.active: OrderedDict[str, Version] = OrderedDict()  # public name -> version, LRU order
        self.errors: dict[str, str] = {}
        self._name_locks: dict[str, threading.Lock] = {}
        self._meta = threading.Lock()
        self._counter = 0

    # ---- loading ----
    def check_path(self, path: str | Path, name: str) -> Path:
        """Adapters load from the allowed folder only: no `..`, no symlinks out, safetensors only."""
        p = Path(path)
        if self.allowed_dir is not None:
            if not p.is_absolute():
                p = self.allowed_dir / p
            resolved = p.resolve()
            if resolved != self.allowed_dir and self.allowed_dir not in resolved.parents:
                raise PermissionError(f"adapter path {path} is outside the allowed adapters folder")
            p = resolved
        if not (p / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no adapter_config.json in {path}")
        if not (p / "adapter_model.safetensors").is_file():
            raise ValueError(f"{path} has no adapter_model.safetensors (pickle .bin adapters are refused)")
        return p

    def load(self, name: str, path: str | Path) -> Version:
        """Load (or reload) `name` from `path`; the previous version keeps serving until this succeeds."""
        with self._lock_for(name):
            p = self.check_path(path, name)
            fp = fingerprint(p)
            with self._meta:
                self._counter += 1
                internal = f"{name}@{self._counter}"
            try:
                with self.model_lock:
                    self._attach(p, internal)
            except Exception as e:
                self.errors[name] = f"{type(e).__name__}: {e}"
                log.error("adapter %s from %s failed to load: %s", name, p, e)
                raise ValueError(f"adapter {name} could not be loaded from {path}: {e}") from None
            with self._meta:
                old = self.active.get(name)
                self.active[name] = Version(internal, p, fp)  # the atomic switch
                self.active.move_to_end(name)
                self.errors.pop(name, None)
            if old is not None:
                self._retire(old)
            self._evict()
            return self.active[name]

    def _attach(self, path: Path, internal: str) -> None:
        from peft import PeftModel

        if hasattr(self.net, "peft_config"):
            self.net.load_adapter(str(path), adapter_name=internal)
        else:
            self.net = PeftModel.from_pretrained(self.net, str(path), adapter_name=internal)
        self.net.eval()

    def unload(self, name: str) -> None:
        with self._lock_for(name):
            with self._meta:
                version = self.active.pop(name, None)
            if version is None:
                raise KeyError(name)
            self._retire(version)

    def _retire(self, version: Version) -> None:
        with self._meta:
            version.retired = True
            free = version.users == 0
        if free:
            self._delete(version)

    def _delete(self, version: Version) -> None:
        with self.model_lock:
            if hasattr(self.net, "peft_config") and version.internal in self.net.peft_config:
                self.net.delete_adapter(version.internal)

    def _evict(self) -> None:
        if not self.max_adapters:
            return
        while True:
            with self._meta:
                if len(self.active) <= self.max_adapters:
                    return
                name = next(iter(self.active))  # least recently used
            log.info("unloading %s (least recently used; --max-adapters %d)", name, self.max_adapters)
            self.unload(name)

    def _lock_for(self, name: str) -> threading.Lock:
        with self._meta:
            return self._name_locks.setdefault(name, threading.Lock())

    # ---- use by requests ----
    def acquire(self, name: str) -> Version:
        """Pin the current version of `name` for one request (KeyError if unknown)."""
        with self._meta:
            version = self.active[name]
            self.active.move_to_end(name)
            version.users += 1
            return version

    def release(self, version: Version) -> None:
        with self._meta:
            version.users -= 1
            free = version.retired and version.users == 0
        if free:
            self._delete(version)

    # ---- folder scan (hot reload) ----
    def scan(self, folder: Path) -> list[str]:
        """Load new or changed adapters of `folder` (each subfolder with adapter_config.json); returns names."""
        changed = []
        for run in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            # A subfolder is an adapter, or a `lorakit train` run folder whose adapter/ is republished
            # atomically after every run: `--adapters-dir runs/` serves what training writes.
            sub = run / "adapter" if (run / "adapter" / "adapter_config.json").is_file() else run
            if not (sub / "adapter_config.json").is_file():
                continue
            current = self.active.get(run.name)
            if current is not None and current.fingerprint == fingerprint(sub.resolve()):
                continue
            if self.errors.get(run.name, "").startswith(f"[{fingerprint(sub)}]"):
                continue  # the same broken files: do not retry on every scan
            try:
                self.load(run.name, sub)
                changed.append(run.name)
            except (ValueError, OSError, PermissionError) as e:
                self.errors[run.name] = f"[{fingerprint(sub)}] {e}"
        return changed

    def describe(self) -> dict[str, dict]:
        with self._meta:
            out = {n: {"path": str(v.path), "version": v.internal} for n, v in self.active.items()}
        for n, err in self.errors.items():
            out.setdefault(n, {})["error"] = err
        return out

