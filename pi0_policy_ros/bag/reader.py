"""Reading the input bag: MCAP or sqlite3, Humble or Jazzy message definitions.

`InputBag` opens a rosbag2 directory (or a single `.mcap` / `.db3` file), checks that the topics
a replay needs are there with the right types and messages, and yields messages in bag-time
order, decoded with the definitions the bag carries (Humble's when it carries none: the sensor
and std messages are the same in Humble and Jazzy).

Every problem is one `errors.BagError` naming the bag, the topic and what is wrong; the library's own
exception is chained for debugging.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath
from types import TracebackType
from typing import Any, Iterator, Sequence

import yaml
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import Reader as Rosbag2Reader
from rosbags.typesys import Stores, get_typestore

from pi0_policy_ros.bag.inputs import InputTopic
from pi0_policy_ros.bag.record import decode_cdr, sqlite_uri_chars
from pi0_policy_ros.errors import BagError

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class TopicInfo:
    msgtype: str
    message_count: int


class InputBag:
    """with InputBag(path) as bag: bag.check(inputs); for topic, t_ns, msg in bag.messages(topics): ..."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader: AnyReader | None = None
        self.topics: dict[str, TopicInfo] = {}
        self.mixed_types: dict[str, list[str]] = {}  # topics recorded with several message types

    def __enter__(self) -> InputBag:
        if not self.path.exists():
            raise BagError(f"bag {self.path}: not found")
        if self.path.is_dir() and not (self.path / "metadata.yaml").exists():
            raise BagError(_without_metadata(self.path))
        if self.path.is_file() and _compresses_messages_of(self.path):
            # Read alone, the storage file yields zstd frames where CDR is expected.
            raise BagError(f"bag {self.path}: its messages are compressed (metadata.yaml: compression_mode "
                           f"message), which only the bag directory says: give the bag directory "
                           f"{self.path.parent}")
        try:
            reader = AnyReader([self.path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
            if self.path.is_dir() and not reader.is2:
                # AnyReader takes any path ending in .bag for a ROS 1 bag file; a directory is a
                # rosbag2 bag (`ros2 bag record -o pick.bag`).
                reader.is2, reader.readers = True, [Rosbag2Reader(self.path)]
            if not reader.is2:
                # Its messages are not CDR: every decode would fail, and --realtime would publish them.
                raise BagError(f"bag {self.path}: a ROS 1 bag: expected a rosbag2 bag (a directory, .mcap or "
                               f".db3); convert it first, e.g. rosbags-convert --src {self.path} --dst DIR")
            reader.open()
        except BagError:
            raise
        except Exception as exc:  # noqa: BLE001 - any library failure is one clear BagError
            uri_chars = sqlite_uri_chars(self.path)
            if uri_chars and _is_sqlite3(self.path):
                # rosbags opens the database as the URI `file:PATH?immutable=1`: the path ends early.
                raise BagError(f"bag {self.path}: a sqlite3 bag cannot be read under a path containing "
                               f"{uri_chars} (SQLite reads it as a URI): move or rename it") from exc
            raise BagError(f"bag {self.path}: unreadable (not a rosbag2 MCAP/sqlite3 bag, or truncated): "
                           f"{_describe(exc)}") from exc
        self._reader = reader
        types: dict[str, set[str]] = {}
        counts: dict[str, int] = {}
        for connection in reader.connections:
            types.setdefault(connection.topic, set()).add(connection.msgtype)
            counts[connection.topic] = counts.get(connection.topic, 0) + int(connection.msgcount)
        for topic, msgtypes in types.items():
            if len(msgtypes) > 1:  # an error in check() if a replay reads it, ignored otherwise
                self.mixed_types[topic] = sorted(msgtypes)
            else:
                self.topics[topic] = TopicInfo(next(iter(msgtypes)), counts[topic])
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    @property
    def start_ns(self) -> int:
        assert self._reader is not None
        return int(self._reader.start_time)

    @property
    def end_ns(self) -> int:
        assert self._reader is not None
        return int(self._reader.end_time)

    def check(self, inputs: Sequence[InputTopic]) -> list[InputTopic]:
        """The inputs present in the bag; BagError for an empty bag, a missing required topic, a
        wrong type, or a required topic without messages."""
        if not self.topics or sum(info.message_count for info in self.topics.values()) == 0:
            required = [t.bag_topic for t in inputs if t.required]
            raise BagError(f"bag {self.path}: empty: expected messages on {required}, found none")
        present = []
        for topic in inputs:
            if topic.bag_topic in self.mixed_types:
                raise BagError(f"bag {self.path}: topic {topic.bag_topic} has several message types "
                               f"{self.mixed_types[topic.bag_topic]}: expected one ({topic.msgtype})")
            info = self.topics.get(topic.bag_topic)
            if info is None:
                if topic.required:
                    raise BagError(f"bag {self.path}: topic {topic.bag_topic} ({topic.label}, {topic.msgtype}) "
                                   f"is missing; the bag has {sorted(self.topics)} (use --map "
                                   f"{topic.node_topic}:=BAG_TOPIC if it is recorded under another name)")
                continue
            if info.msgtype != topic.msgtype:
                raise BagError(f"bag {self.path}: topic {topic.bag_topic} ({topic.label}) has type {info.msgtype}, "
                               f"expected {topic.msgtype}{_type_hint(topic)}")
            if info.message_count == 0 and topic.required:
                raise BagError(f"bag {self.path}: topic {topic.bag_topic} ({topic.label}) has no messages")
            present.append(topic)
        return present

    def raw_messages(self, topics: Sequence[str]) -> Iterator[tuple[str, str, int, bytes]]:
        """(topic, msgtype, bag time ns, CDR bytes) in bag-time order."""
        assert self._reader is not None, "InputBag used outside its with-block"
        connections = [c for c in self._reader.connections if c.topic in set(topics)]
        if not connections:
            return
        iterator = self._reader.messages(connections=connections)
        while True:
            try:
                connection, t_ns, raw = next(iterator)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001
                raise BagError(f"bag {self.path}: unreadable after some messages (truncated or corrupt "
                               f"file?): {_describe(exc)}") from exc
            yield connection.topic, connection.msgtype, int(t_ns), raw

    def decode(self, topic: str, msgtype: str, t_ns: int, raw: bytes) -> Any:
        assert self._reader is not None
        try:
            return decode_cdr(raw, msgtype, self._reader.typestore)
        except Exception as exc:  # noqa: BLE001
            raise BagError(f"bag {self.path}: topic {topic}: message at {t_ns / NS_PER_S:.6f} s cannot be decoded "
                           f"as {msgtype} (truncated or corrupt?): {_describe(exc)}") from exc

    def messages(self, topics: Sequence[str]) -> Iterator[tuple[str, int, Any]]:
        """(topic, bag time ns, decoded message) in bag-time order."""
        for topic, msgtype, t_ns, raw in self.raw_messages(topics):
            yield topic, t_ns, self.decode(topic, msgtype, t_ns, raw)


def _without_metadata(path: Path) -> str:
    """The error for a bag directory without metadata.yaml. rosbag2 writes it when a recording ends,
    so a recording still running, or one whose recorder was killed, has none; rosbags' own error
    named the directory as the missing file."""
    files = sorted(p.name for p in path.iterdir() if p.suffix in (".mcap", ".db3"))
    if not files:
        return (f"bag {path}: unreadable: no metadata.yaml in it and no .mcap or .db3 file: expected a rosbag2 "
                f"bag directory")
    which = f"its storage file {files[0]}" if len(files) == 1 else f"one of its storage files {files}"
    return (f"bag {path}: unreadable: no metadata.yaml in it (rosbag2 writes it when a recording ends: a recording "
            f"still running, or whose recorder was killed, has none): give {which} instead, or write it with "
            f"`ros2 bag reindex {path}`")


def _is_sqlite3(path: Path) -> bool:
    """A .db3 file, or a bag directory holding one."""
    return path.suffix == ".db3" or (path.is_dir() and any(path.glob("*.db3*")))


def _compresses_messages_of(storage_file: Path) -> bool:
    """Whether the metadata.yaml beside `storage_file` lists it in a bag of compressed messages."""
    try:
        info = yaml.safe_load((storage_file.parent / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        files = [PurePath(name).name for name in info["relative_file_paths"]]
        return str(info.get("compression_mode", "")).lower() == "message" and storage_file.name in files
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False  # no such bag directory: the file is read as it is


def _type_hint(topic: InputTopic) -> str:
    if topic.role == "camera":
        return " (set camera_types to 'raw' for sensor_msgs/msg/Image, 'compressed' for CompressedImage)"
    return ""


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
