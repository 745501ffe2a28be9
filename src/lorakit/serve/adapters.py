"""The adapters a server knows: public names, versions, locks, LRU eviction and hot reload.

A known adapter is a public name and a folder. It is loaded at start, by the load endpoint, by a
folder scan, or on demand when a request names it after `--max-adapters` evicted it (as vLLM's
LoRA cache does). Each load gets a fresh internal name (`name@N`); the public name switches to it in
one assignment, so a request sees either the old version or the new one. A version leaves the model
only when no in-flight request still uses it. A broken or half-written adapter never replaces a
working one: its error is recorded and shown in /v1/models, whatever the error (a folder scan goes on with the
others). An evicted adapter whose folder was deleted is forgotten when a request names it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit import adapter, render
from lorakit.errors import LorakitError
from lorakit.run_folder import ADAPTER_CONFIG, find_adapter, locate

log = logging.getLogger("lorakit.serve")
FILES = (ADAPTER_CONFIG, "adapter_model.safetensors")


@dataclass(frozen=True)
class Chat:
    """How one model (the base, or an adapter version) reads chats and ends answers.

    An adapter answers chats in the template it was trained with, saved with it (`render.setup_template` set
    it on the tokenizer that training saved into adapter/), which need not be the base's. The vocabulary is
    the base's: only the template and the ids that end a turn differ.
    """

    tokenizer: Any
    template: str | None  # `render.template_name`: chatml, llama2…, "base", "custom", None (cannot chat)
    stop_ids: frozenset[int]

    @classmethod
    def of(cls, tokenizer: Any, generation_config: Any, base_template: str | None = None) -> Chat:
        stops = frozenset(render.stop_ids(tokenizer, generation_config))
        return cls(tokenizer, render.template_name(tokenizer, base_template), stops)


def adapter_chat(path: Path, base: Chat, generation_config: Any, rows: int) -> Chat:
    """An adapter's Chat: the tokenizer saved in its folder, else the base's; a ValueError if it cannot be read.

    rows: the base's embedding rows. A saved tokenizer with ids beyond them (tokens added for another
    vocabulary) is a ValueError too: its template or a prompt would render them, and each such request would fail.
    """
    from lorakit import model

    try:
        tokenizer = model.saved_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - any broken tokenizer file is the upload's error, not the server's
        raise ValueError(f"its tokenizer in {path} cannot be read: {e}") from None
    if tokenizer is None:
        return base
    ids = max(len(tokenizer), 1 + max(tokenizer.get_vocab().values(), default=-1))  # the ids it can produce
    if ids > rows:
        raise ValueError(
            f"the tokenizer saved in {path} has {ids} token ids, but the base has only {rows} token embeddings: "
            "it belongs to another vocabulary (tokens added?). Save the adapter with the base's tokenizer, or serve "
            "it on the base it was trained with"
        )
    if tokenizer.chat_template == base.tokenizer.chat_template:
        return base  # the same prompts and stops: one tokenizer in memory, not one per adapter
    return Chat.of(tokenizer, generation_config, base.tokenizer.chat_template)


@dataclass
class Version:
    internal: str
    path: Path
    fingerprint: str
    chat: Chat  # its template and stop ids
    users: int = 0
    retired: bool = False
    loaded_at: float = field(default_factory=time.time)  # when this version went live (shown by the page)


def fingerprint(path: Path) -> str:
    """Changes whenever the adapter's files change (size and mtime of its config and weights), or the config.yaml
    of its run (which its load reads): a broken one fixed is tried again."""
    found = locate(path)
    run_config = [found.run.config] if found is not None and found.run is not None else []
    parts = []
    for f in (*(path / name for name in FILES), *run_config):
        st = f.stat() if f.exists() else None
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}" if st else f"{f.name}:-")
    return "|".join(parts)


def subfolders(folder: Path) -> list[Path]:
    """The subfolders of an --adapters-dir that may hold an adapter; dot-folders (an upload or a write in
    progress, hidden ones) are not adapters."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def adapters_in(folder: Path) -> dict[str, Path]:
    """The adapters an --adapters-dir holds, by name: each subfolder that is an adapter or a `lorakit train` run
    folder holding one."""
    return {sub.name: found for sub in subfolders(folder) if (found := find_adapter(sub)) is not None}


class NameTaken(ValueError):
    """An adapter named like the base model: requests for that name would reach the base."""


@dataclass(frozen=True)
class Admission:
    """What an adapter must be to be served beside this base, checked before it touches the model."""

    served_name: str = ""  # the base's public name: no adapter may take it
    base: str | None = None  # the base model as named at startup; adapters must have been trained on it
    per_row: bool = True  # mixed batches (peft's per-row adapter_names), which some adapters cannot join
    force: bool = False  # accept adapters trained on another base (the same weights under another name)
    quantization: str | None = None  # how the base is loaded ("4bit", "8bit", None: unquantized)

    def check(self, name: str, path: Path) -> None:
        """ValueError saying why `name` (files at `path`) cannot be served here."""
        if name == self.served_name:
            raise NameTaken(f"'{name}' is the base model's name; give the adapter another name")
        try:
            meta = adapter.read_adapter(path)
            if self.base:
                adapter.check_base(meta, self.base, force=self.force, where=f"adapter {name} ({path})")
            why = adapter.base_mismatch(name, path, self.quantization)  # reads its run's config.yaml, if any
        except LorakitError as e:  # a malformed adapter_config.json or config.yaml, another base
            raise ValueError(str(e)) from None
        if why:
            log.warning(why)  # served all the same: the operator chose this base
        # peft refuses adapter_names with DoRA, and a modules_to_save copy (lm_head, say) looks up every
        # adapter of the batch in its own table: a KeyError for all the other adapters' rows. A config that is
        # no LoRA one has neither field: peft's load says what it is.
        unmixable = (
            "it is a DoRA adapter"
            if getattr(meta, "use_dora", False)
            else f"it trains whole modules ({sorted(meta.modules_to_save)}, modules_to_save)"
            if getattr(meta, "modules_to_save", None)
            else None
        )
        if self.per_row and unmixable:
            raise ValueError(
                f"adapter {name} cannot join mixed-adapter batches: {unmixable}, which peft's per-row "
                "adapters cannot run. Serve it with --batching off, or merge it (lorakit merge) and "
                "serve the merged model"
            )


class Registry:
    def __init__(
        self,
        base_model: Any,
        model_lock: threading.Lock,
        chat: Chat,
        allowed_dir: Path | None = None,
        max_adapters: int | None = None,
        admission: Admission | None = None,
    ):
        self.net = base_model  # a PeftModel while at least one adapter is loaded
        self.generation_config = base_model.generation_config  # the base's EOS ids end every model's answers
        self.vocab_rows = base_model.get_input_embeddings().weight.shape[0]  # no adapter's tokenizer may go past
        self.chat = chat  # the base's; each adapter version has its own (`adapter_chat`)
        self.model_lock = model_lock
        self.admission = admission or Admission()
        self.allowed_dir = allowed_dir.resolve() if allowed_dir else None
        self.max_adapters = max_adapters
        # public name -> (folder, confined to allowed_dir, fingerprint of the version last loaded)
        self.known: dict[str, tuple[Path, bool, str]] = {}
        self.active: OrderedDict[str, Version] = OrderedDict()  # loaded: public name -> version, LRU order
        self.errors: dict[str, str] = {}  # public name -> why its newest files did not load
        self._failed: dict[str, str] = {}  # public name -> fingerprint of those files (not retried until changed)
        self._name_locks: dict[str, threading.RLock] = {}
        self._meta = threading.Lock()  # guards known/active/users; never held while loading
        self._counter = 0

    # ---- loading ----
    def check_path(self, path: str | Path, confined: bool = True) -> Path:
        """The adapter folder to read. Confined: inside the allowed folder (no `..`, no symlink out, for
        the folder and its files; a ValueError for its run's config.yaml linking out, a broken upload).
        Always: safetensors weights, since a pickle (.bin) runs code on load."""
        p = Path(path)
        if confined:
            if self.allowed_dir is None:
                raise PermissionError("loading adapters at run time needs the server started with --adapters-dir")
            p = p if p.is_absolute() else self.allowed_dir / p
            p = find_adapter(p) or p  # a run folder stands for its adapter/
            for f in (p, *(p / name for name in FILES)):
                if not self._inside(f):
                    raise PermissionError(f"adapter path {path} is outside the allowed adapters folder")
            run = found.run if (found := locate(p)) is not None else None
            # Its config.yaml is read for its method (adapter.base_mismatch). A run folder around the allowed one
            # (--adapters-dir RUN/checkpoints) is the operator's; one inside may not link out.
            if run is not None and self._inside(run.root) and not self._inside(run.config):
                raise ValueError(
                    f"{run.config} links out of the adapters folder, where run-time loads read nothing: copy the "
                    "file itself in"
                )
        p = p.resolve()
        if not (p / FILES[0]).is_file():
            raise FileNotFoundError(f"no adapter_config.json in {path}")
        if not (p / FILES[1]).is_file():
            raise ValueError(f"{path} has no adapter_model.safetensors (pickle .bin adapters are refused)")
        return p

    def _inside(self, f: Path) -> bool:
        """Whether `f`, links followed, lies in the allowed folder (or is it)."""
        resolved = f.resolve()
        return resolved == self.allowed_dir or self.allowed_dir in resolved.parents

    def load(self, name: str, path: str | Path, confined: bool = True, pin: bool = False) -> Version:
        """Load (or reload) `name` from `path`; the previous version keeps serving until this succeeds.

        pin: count the new version as used by one request (see `acquire`) before anything can evict it.
        """
        with self._lock_for(name):
            p = self.check_path(path, confined)
            self.admission.check(name, p)
            fp = fingerprint(p)
            try:  # read before the model lock: tokenizers take a while to load
                chat = adapter_chat(p, self.chat, self.generation_config, self.vocab_rows)
            except ValueError as e:  # unreadable, or it does not fit the base
                raise ValueError(f"adapter {name}: {e}") from None
            with self._meta:
                self._counter += 1
                # peft names modules after adapters: no "." there (a public name like sql-v1.5 is fine).
                internal = f"{adapter.peft_name(name)}@{self._counter}"
            try:
                with self.model_lock:
                    self._attach(p, internal)
            except Exception as e:  # noqa: BLE001 - any broken file: keep serving the previous version
                log.error("adapter %s from %s failed to load: %s", name, p, e)
                raise ValueError(f"adapter {name} could not be loaded from {path}: {e}") from None
            version = Version(internal, p, fp, chat, users=int(pin))
            with self._meta:
                old = self.active.get(name)
                self.known[name] = (p, confined, fp)
                self.active[name] = version  # the atomic switch
                self.active.move_to_end(name)
                self.errors.pop(name, None)
                self._failed.pop(name, None)
            if old is not None:
                self._retire(old)
        self._evict()
        return version

    def _attach(self, path: Path, internal: str) -> None:
        """Add the adapter at `path` as `internal`; if that fails, the model is left exactly as it was."""
        self.net = adapter.load(self.net, path, internal).eval()

    def unload(self, name: str) -> None:
        """Forget `name` (KeyError if unknown); its loaded version goes once no request uses it."""
        with self._lock_for(name):
            with self._meta:
                if self.known.pop(name, None) is None:
                    raise KeyError(name)
                version = self.active.pop(name, None)
                self.errors.pop(name, None)
                self._failed.pop(name, None)
            if version is not None:
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
                self._remove(version.internal)

    def _remove(self, internal: str) -> None:
        """Take one adapter out of the model (the caller holds the model lock)."""
        self.net = adapter.remove(self.net, internal)

    def _evict(self) -> None:
        """Unload least recently used versions over `max_adapters`; they stay known and load again on demand."""
        while self.max_adapters:
            with self._meta:
                if len(self.active) <= self.max_adapters:
                    return
                name, version = self.active.popitem(last=False)
            log.info("unloading %s (least recently used; --max-adapters %d)", name, self.max_adapters)
            self._retire(version)

    def _lock_for(self, name: str) -> threading.RLock:
        with self._meta:
            # Reentrant: an on-demand reload (acquire) holds it while it calls load, which takes it again.
            return self._name_locks.setdefault(name, threading.RLock())

    # ---- use by requests ----
    def acquire(self, name: str) -> Version:
        """Pin the current version of `name` for one request, loading it if it was evicted (KeyError if unknown)."""
        with self._meta:
            if (version := self._pin_loaded(name)) is not None:
                return version
            if name not in self.known:  # before a lock is made for a name nobody served
                raise KeyError(name)
        with self._lock_for(name):
            with self._meta:  # requests that waited for this lock find the version the first one loaded
                if (version := self._pin_loaded(name)) is not None:
                    return version
                path, confined, _ = self.known[name]
            try:
                return self.load(name, path, confined, pin=True)
            except FileNotFoundError:  # its folder was deleted while it was unloaded: forget it, as unload does
                self.unload(name)
                raise

    def _pin_loaded(self, name: str) -> Version | None:
        """The loaded version of `name`, counted as used by one more request (the caller holds _meta)."""
        version = self.active.get(name)
        if version is not None:
            self.active.move_to_end(name)
            version.users += 1
        return version

    def share(self, version: Version, more: int) -> None:
        """Count `more` requests rows as users of a version already pinned (held by the caller's own pin)."""
        with self._meta:
            version.users += more

    def release(self, version: Version) -> None:
        with self._meta:
            version.users -= 1
            free = version.retired and version.users == 0
        if free:
            self._delete(version)

    # ---- folder scan (hot reload) ----
    def scan(self, folder: Path) -> list[str]:
        """Load new or changed adapters of `folder`; returns their names.

        Each subfolder is an adapter, or a `lorakit train` run folder whose adapter/ training republishes
        atomically: `--adapters-dir runs/` serves what training writes. Evicted adapters whose files did
        not change stay unloaded until a request names them.
        """
        folder = folder.absolute()  # a relative --adapters-dir is the working directory's, not the allowed folder's
        changed = []
        for sub in subfolders(folder):
            fp = None
            try:  # any error of one folder (a broken config.yaml, unreadable files) is that adapter's alone
                if (found := find_adapter(sub)) is None:
                    continue
                fp = fingerprint(found)
                with self._meta:
                    known = self.known.get(sub.name)
                unchanged = known is not None and known[0] == found.resolve() and known[2] == fp
                if unchanged or self._failed.get(sub.name) == fp:
                    continue  # unchanged (loaded, or evicted until a request names it), or the same broken files
                self.load(sub.name, found)
                changed.append(sub.name)
            except Exception as e:  # noqa: BLE001 - shown in /v1/models; the other folders still load
                log.error("adapter %s not loaded: %s", sub.name, e)
                with self._meta:
                    self.errors[sub.name], self._failed[sub.name] = str(e), fp
        return changed

    def describe(self) -> dict[str, dict]:
        """Public name -> {path, loaded, version?, chat_template?, error?} for every known or failed adapter."""
        with self._meta:
            out = {n: {"path": str(k[0]), "loaded": n in self.active} for n, k in self.known.items()}
            for n, v in self.active.items():
                out[n].update(version=v.internal, loaded_at=int(v.loaded_at), chat_template=v.chat.template)
            for n, err in self.errors.items():
                out.setdefault(n, {"path": None, "loaded": False})["error"] = err
        return out
