"""Writing bags: never half-written, always with the Jazzy message definitions.

`OutputBag` stages the bag in a hidden directory beside the destination, under the final name
(rosbag2 names the storage file after its directory, and `metadata.yaml` lists that name), and
moves it into place only when everything was written. On any error the staging directory is
removed and the destination is left as it was.

Payloads are written as canonical CDR: a message serialised elsewhere (rclpy's Fast-CDR leaves
alignment padding uninitialised) is decoded and re-encoded with the rosbags typestore, so that
the same messages always give the same bytes.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.serde import SerdeError
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

from pi0_policy_ros.errors import Pi0PolicyError

STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
DISTROS = {"jazzy": (Stores.ROS2_JAZZY, 9), "humble": (Stores.ROS2_HUMBLE, 8)}
SQLITE_URI_CHARS = "?#%"  # what ends or escapes a path in an SQLite URI


def sqlite_uri_chars(path: Path) -> list[str]:
    """The characters of `path` (resolved) that rosbags' SQLite URI `file:PATH` cannot carry."""
    return sorted(set(SQLITE_URI_CHARS) & set(str(path.resolve())))

_TYPESTORES: dict[str, Typestore] = {}


def typestore(distro: str = "jazzy") -> Typestore:
    """The rosbags typestore of a ROS distro's standard messages (cached)."""
    if distro not in DISTROS:
        raise Pi0PolicyError(f"distro: expected one of {sorted(DISTROS)}, found {distro!r}")
    if distro not in _TYPESTORES:
        _TYPESTORES[distro] = get_typestore(DISTROS[distro][0])
    return _TYPESTORES[distro]


class OutputError(Pi0PolicyError):
    """The output bag cannot be written where asked."""


def check_output_path(path: str | Path, overwrite: bool) -> None:
    """OutputError unless a bag may be written at `path`: nothing there (in an existing directory),
    or, with `overwrite`, a bag directory (one with metadata.yaml). --overwrite deletes what is
    there, so a file or a directory that is not a bag (a checkpoint, a config folder, a typo for
    one) is refused."""
    path = Path(path)
    if not path.parent.is_dir():
        found = "a file" if path.parent.exists() else "none"
        raise OutputError(f"output {path}: expected an existing directory {path.parent}, found {found}")
    if not os.access(path.parent, os.W_OK | os.X_OK):  # else found when the bag opens, after the policy load
        raise OutputError(f"output {path}: expected a directory it may write in, found {path.parent}: not writable")
    if path.is_symlink():
        # The bag is moved into place last: onto a link it failed only then, after the whole replay
        # (rmtree refuses a link to a bag; a rename onto a dangling link is "Not a directory").
        raise OutputError(f"output {path}: expected a bag directory or a new path, found a symbolic link to "
                          f"{os.readlink(path)}; give the path it points to, or remove the link")
    if not path.exists():
        return
    if not (path.is_dir() and (path / "metadata.yaml").is_file()):
        found = "a directory without metadata.yaml" if path.is_dir() else "a file"
        if not overwrite:  # advice to pass --overwrite would only meet the refusal below
            raise OutputError(f"output {path} already exists ({found}, not a bag): remove it yourself or choose "
                              f"another path")
        raise OutputError(f"output {path}: --overwrite replaces only a bag directory (with metadata.yaml), "
                          f"found {found}; remove it yourself or choose another path")
    if not overwrite:
        raise OutputError(f"output {path} already exists: remove it or pass --overwrite")


def rclpy_to_cdr(msg: Any, msgtype: str, store: Typestore | None = None) -> bytes:
    """An rclpy message -> canonical CDR bytes (the message content exactly as rclpy has it)."""
    from rclpy.serialization import serialize_message  # only the output path needs rclpy

    return canonical_cdr(serialize_message(msg), msgtype, store)


def decode_cdr(raw: bytes | memoryview, msgtype: str, store: Typestore) -> Any:
    """CDR bytes -> a rosbags message, ignoring bytes after the message's end.

    Fast-CDR (rclpy's `serialize_message`, and what Fast DDS hands to rosbag2) may append unused
    bytes, e.g. 80 after a JointTrajectory; rosbags' `deserialize_cdr` refuses more than 3, every
    CDR decoder in ROS ignores them.
    """
    if len(raw) < 4 or bytes(raw[:2]) not in (b"\x00\x00", b"\x00\x01"):
        raise SerdeError(f"{msgtype}: expected a CDR encapsulation header, found {bytes(raw[:4]).hex()!r}")
    msgdef = store.get_msgdef(msgtype)
    decode = msgdef.deserialize_cdr_le if raw[1] else msgdef.deserialize_cdr_be
    try:
        message, _ = decode(memoryview(raw)[4:], 0, msgdef.cls, store)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise SerdeError(f"could not deserialize {msgtype!r}: {exc}") from exc
    return message


def canonical_cdr(raw: bytes, msgtype: str, store: Typestore | None = None) -> bytes:
    """CDR bytes from any serializer -> rosbags' CDR of the same message (zeroed padding, no
    trailing bytes)."""
    store = store or typestore()
    return bytes(store.serialize_cdr(decode_cdr(raw, msgtype, store), msgtype))


class OutputBag:
    """A rosbag2 directory written atomically.

    with OutputBag(path) as bag:
        bag.write(topic, msgtype, t_ns, cdr_bytes)
    Connections are added on first use of a topic (or up front with `add_topic`).
    """

    def __init__(self, path: str | Path, storage: str = "mcap", distro: str = "jazzy", overwrite: bool = False) -> None:
        self.path = Path(path)
        if storage not in STORAGES:
            raise OutputError(f"storage: expected one of {sorted(STORAGES)}, found {storage!r}")
        self.storage = storage
        self.distro = distro
        self.store = typestore(distro)
        self.overwrite = overwrite
        self.message_count = 0
        self._stage: Path | None = None
        self._writer: Writer | None = None
        self._connections: dict[str, Any] = {}

    def __enter__(self) -> OutputBag:
        check_output_path(self.path, self.overwrite)
        parent = self.path.parent
        uri_chars = sqlite_uri_chars(self.path)
        if self.storage == "sqlite3" and uri_chars:
            # rosbags opens the database as the URI `file:PATH`: the path would end at '?' or '#'
            # (the database written elsewhere, the bag left without it), and '%' escapes characters.
            raise OutputError(f"output {self.path}: sqlite3 storage cannot be written under a path containing "
                              f"{uri_chars} (SQLite reads it as a URI): choose another path, or --storage mcap")
        self._stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial", dir=parent))
        _, version = DISTROS[self.distro]
        self._writer = Writer(self._stage / self.path.name, version=version, storage_plugin=STORAGES[self.storage])
        self._writer.open()
        return self

    def add_topic(self, topic: str, msgtype: str) -> None:
        if topic in self._connections:
            if self._connections[topic].msgtype != msgtype:
                raise OutputError(f"output topic {topic}: expected type {self._connections[topic].msgtype}, "
                                  f"found {msgtype}")
            return
        assert self._writer is not None, "OutputBag used outside its with-block"
        self._connections[topic] = self._writer.add_connection(topic, msgtype, typestore=self.store)

    def write(self, topic: str, msgtype: str, t_ns: int, cdr: bytes) -> None:
        self.add_topic(topic, msgtype)
        assert self._writer is not None
        self._writer.write(self._connections[topic], int(t_ns), cdr)
        self.message_count += 1

    def write_message(self, topic: str, msgtype: str, t_ns: int, msg: Any) -> None:
        """A rosbags message object of this bag's typestore."""
        self.write(topic, msgtype, t_ns, bytes(self.store.serialize_cdr(msg, msgtype)))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        stage, writer = self._stage, self._writer
        self._stage = self._writer = None
        try:
            if writer is not None:
                writer.close()
            if exc_type is None and stage is not None:
                if self.path.exists():
                    shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
                os.replace(stage / self.path.name, self.path)
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
