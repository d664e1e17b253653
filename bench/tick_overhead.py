"""The control tick's host-side cost at the ALOHA geometry, without the model's inference. CPU only.

README ("The node") puts each tick on the H100 at the engine's time plus ~10 ms of Python on one
core. This times that Python, part by part, through the code the node runs:
- inputs as the node receives them: serialized sensor_msgs (3 cameras of 640x480, raw rgb8 `Image`
  or JPEG `CompressedImage`, and a 14-joint `JointState`), stored as the node's input callbacks do
  (`convert.stamp_from_cdr`, `ObservationBuffer.put_image`, `convert.JointStateReader`);
- `ControlStep.run` with the node's decoders (`PolicyNode._decode`: the frame's serialized fields,
  then its pixels; JPEG cameras in parallel, as the node decodes compressed ones) and the safety
  filter and scheduler of `config/demo_cuda.yaml`'s parameters (ALOHA limits, 30 Hz);
- the real `Policy` around its engine: resize with pad on the CPU (`resize: cpu`, the default) or
  frames passed to the engine as they are (`resize: engine`, camera_height/width set), normalize,
  tokenize, RTC guidance, unnormalize, output transforms;
- the messages `_control_step` publishes (Header, Float32MultiArray, JointTrajectory), built with
  `ros/convert.py` and published by rclpy publishers on ROS_DOMAIN_ID with the node's QoS (no
  subscriber: `publish` is rclpy's conversion, serialization and the RMW write, no delivery).

The engine is `PrecomputedEngine`, a measurement harness, not a product mock: it returns one network
output computed beforehand (a smooth chunk starting at the measured position, inside the limits),
so the tick's Python is all that is timed. The clock is simulated: ticks one control period apart,
inputs stamped INPUT_AGE_S before each tick, and the engine taking ENGINE_S of simulated time (the
tick's second reading of the clock). Chunk modes naive, rtc_fast, temporal_ensemble; the last two
infer every `execute_horizon` action periods and WAIT between (timed apart: `wait_ms`).

    ROS_DOMAIN_ID=<yours> PYTHONPATH=. python3 bench/tick_overhead.py --json bench/results/tick_overhead_cpu.json \
        [--compare BASE_ROOT] [--rounds 3] [--ticks 200] [--cases 'raw/*/naive' ...]

--compare BASE_ROOT: alternate rounds of the package at BASE_ROOT (e.g. `git archive` of an earlier
commit) and of this checkout, each in its own process, and report both ("before", "after").
`messages_sha256` digests the fields of every message built, per case: equal digests, the same outputs.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import hashlib
import inspect
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO / "config" / "demo_cuda.yaml"
CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
FRAME_HW = (480, 640)
JPEG_QUALITY = 95  # image_transport's compressed publisher default
CONTROL_RATE_HZ = 30.0  # the rate README reports for the H100 (run 99)
INPUT_AGE_S = 0.010  # inputs stamped this long before the tick
ENGINE_S = 0.010  # simulated time the engine takes (the clock's second reading in a tick)
T0_S = 1.7e9  # epoch-sized stamps, as ROS time gives
WARMUP_TICKS = 20
MODES = ("naive", "rtc_fast", "temporal_ensemble")
IMAGE_KINDS = ("raw", "jpeg")
RESIZES = ("cpu", "engine")


class PrecomputedEngine:
    """Stands in for `engine.Engine` in the benchmark: `infer` returns a copy of one network output
    [H, model action dims] computed beforehand. A measurement harness, not a product mock."""

    def __init__(self, output: np.ndarray) -> None:
        self._output = output
        self.last_timings_ms: dict[str, float] = {}

    def infer(self, batch: Any, guidance: Any = None) -> np.ndarray:
        return self._output.copy()


class PartTimer:
    """Wall time per named part, summed over the calls within one tick."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[name] += (time.perf_counter() - t0) * 1e3
        return timed


def _canonical(value: Any) -> bytes:
    """A ROS message's field values as bytes, for digests: its serialized form will not do, as
    Fast-CDR leaves the alignment padding uninitialised."""
    if hasattr(value, "get_fields_and_field_types"):
        return b"{" + b",".join(name.encode() + b"=" + _canonical(getattr(value, name))
                                for name in value.get_fields_and_field_types()) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(_canonical(item) for item in value) + b"]"
    if hasattr(value, "tobytes"):  # array.array, numpy
        return getattr(value, "typecode", "").encode() + value.tobytes()
    return repr(value).encode()


def _stats(samples: list[float]) -> dict[str, float]:
    return {"median": round(float(np.median(samples)), 4), "p99": round(float(np.percentile(samples, 99)), 4),
            "n": len(samples)}


def _frame(index: int, rng: np.random.Generator) -> np.ndarray:
    """A 640x480 RGB scene (the demo robot's shapes) with camera-like noise: JPEG sizes and decode times
    of a flat synthetic frame would be far below a camera's."""
    from pi0_policy_ros.ros.demo import synthetic_frame

    frame = synthetic_frame(0.3, index, FRAME_HW).astype(np.int16)
    ramp = np.linspace(0, 60, FRAME_HW[1], dtype=np.int16)[None, :, None]
    noise = rng.normal(0.0, 4.0, frame.shape).astype(np.int16)
    return np.clip(frame + ramp + noise, 0, 255).astype(np.uint8)


def _serialized_inputs(kind: str, joint_names: tuple[str, ...], state: np.ndarray) -> tuple[list[bytes], bytes]:
    import cv2
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import CompressedImage, Image, JointState

    rng = np.random.default_rng(0)
    frames = []
    for index, camera in enumerate(CAMERAS):
        rgb = _frame(index, rng)
        if kind == "jpeg":
            ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            assert ok
            msg = CompressedImage(format="rgb8; jpeg compressed bgr8", data=jpeg.tobytes())
        else:
            msg = Image(height=FRAME_HW[0], width=FRAME_HW[1], encoding="rgb8", step=FRAME_HW[1] * 3, data=rgb.tobytes())
        msg.header.frame_id = camera
        frames.append(serialize_message(msg))
    joints = JointState(name=list(joint_names), position=state.tolist(), velocity=[0.0] * len(state),
                        effort=[0.0] * len(state))
    return frames, serialize_message(joints)


def _stamped(data: bytes, stamp_s: float) -> bytes:
    """The serialized message with header.stamp set (plain little-endian CDR, as rclpy writes on x86)."""
    from pi0_policy_ros.control.trajectory import split_seconds

    assert data[:2] == b"\x00\x01", data[:2]
    out = bytearray(data)
    struct.pack_into("<iI", out, 4, *split_seconds(stamp_s))
    return bytes(out)


def _network_output(profile: Any, normalizer: Any, state: np.ndarray, horizon: int, model_dims: int) -> np.ndarray:
    """The normalized network output whose robot actions start at the measured position and move
    smoothly (within ALOHA's step and velocity limits: no clamp)."""
    from pi0_policy_ros.policy.normalize import ACTIONS_KEY
    from pi0_policy_ros.policy.robots import robot_actions_to_model, state_in_action_units, transform_state

    start = state_in_action_units(profile, state)
    k = np.arange(horizon, dtype=np.float64)[:, None]
    phases = np.arange(profile.action_dim, dtype=np.float64)[None, :]
    robot = start[None, :] + 0.05 * np.sin(0.05 * k + 0.3 * phases) - 0.05 * np.sin(0.3 * phases)
    model_side = robot_actions_to_model(profile, robot, transform_state(profile, state))
    output = np.zeros((horizon, model_dims), dtype=np.float32)
    output[:, : profile.action_dim] = normalizer.normalize(ACTIONS_KEY, model_side)
    return output


class Case:
    """One node configuration: the step, its policy, buffers and publishers, fed one tick at a time."""

    def __init__(self, kind: str, resize: str, mode: str, ros_node: Any, tokenizer_path: Path) -> None:
        from pi0_policy_ros.control.observation_buffer import ObservationBuffer
        from pi0_policy_ros.control.safety import SafetyFilter
        from pi0_policy_ros.control.step import ControlStep, action_state_indices
        from pi0_policy_ros.model.config import get_preset
        from pi0_policy_ros.policy.normalize import Normalizer, identity_stats
        from pi0_policy_ros.policy.policy import Policy
        from pi0_policy_ros.policy.robots import configured_profile, state_in_action_units
        from pi0_policy_ros.policy.tokenizer import PromptTokenizer
        from pi0_policy_ros.ros import convert
        from pi0_policy_ros.ros.node import PolicyNode
        from pi0_policy_ros.ros.params import config_from_params, load_params_file
        from pi0_policy_ros.ros.qos import CHUNK_QOS, COMMAND_QOS
        from rclpy.serialization import deserialize_message
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float32MultiArray, Header
        from trajectory_msgs.msg import JointTrajectory

        values = load_params_file(PARAMS_FILE)
        values.update(device="cpu", chunk_mode=mode, control_rate_hz=CONTROL_RATE_HZ,
                      camera_types=["compressed" if kind == "jpeg" else "raw"] * len(CAMERAS),
                      camera_height=FRAME_HW[0] if resize == "engine" else 0,
                      camera_width=FRAME_HW[1] if resize == "engine" else 0)
        profile = configured_profile(config_from_params(values).policy)
        config = config_from_params(values).resolve(profile)
        self.config = config
        model_cfg = get_preset(config.policy.model_preset).replace(action_horizon=profile.action_horizon)
        normalizer = Normalizer(identity_stats(profile.state_dim, profile.action_dim), use_quantiles=model_cfg.pi05)
        tokenizer = PromptTokenizer(tokenizer_path, model_cfg.max_token_len, discrete_state_input=True)
        # Joints near ALOHA's rest pose, grippers half open (normalized finger position).
        self.state = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.5] * 2) + 0.01 * np.arange(14)
        engine = PrecomputedEngine(_network_output(profile, normalizer, self.state, model_cfg.action_horizon,
                                                   model_cfg.action_dim))
        self.policy = Policy(config.policy, model_cfg, profile, normalizer, tokenizer, engine,  # type: ignore[arg-type]
                             "bench/tick_overhead.py: PrecomputedEngine")
        self.safety = SafetyFilter(config.safety, profile.action_dim, profile.action_period_s)
        self.buffer = ObservationBuffer(CAMERAS, config.control)
        self.buffer.put_prompt(config.policy.default_prompt)
        decoders = {c.name: functools.partial(PolicyNode._decode, c.compressed) for c in config.cameras}
        # As the node: the compressed cameras decode in parallel (a step from before that, under
        # --compare, has no such argument).
        parallel = ({"parallel_cameras": [c.name for c in config.cameras if c.compressed]}
                    if "parallel_cameras" in inspect.signature(ControlStep).parameters else {})
        self.step = ControlStep(self.policy, self.buffer, decoders, self.safety, config.scheduler,
                                action_state_indices(config.joint_names, config.action_joint_names,
                                                     profile.action_space),
                                config.hold_mode, functools.partial(state_in_action_units, profile), **parallel)
        self.step.prepare(profile.action_horizon, profile.action_period_s)
        self.reader = convert.JointStateReader(config.joint_names,
                                               functools.partial(deserialize_message, message_type=JointState))
        self.frames, self.joints = _serialized_inputs(kind, config.joint_names, self.state)
        self.stamp_pub = ros_node.create_publisher(Header, "~/action_chunk_stamp", CHUNK_QOS)
        self.chunk_pub = ros_node.create_publisher(Float32MultiArray, "~/action_chunk", CHUNK_QOS)
        self.trajectory_pub = ros_node.create_publisher(JointTrajectory, "~/joint_trajectory", COMMAND_QOS)
        self.parts = PartTimer()
        self.buffer.snapshot = self.parts.wrap("snapshot", self.buffer.snapshot)  # type: ignore[method-assign]
        self.policy.infer = self.parts.wrap("policy", self.policy.infer)  # type: ignore[method-assign]
        self.safety.apply = self.parts.wrap("safety", self.safety.apply)  # type: ignore[method-assign]
        self.safety.limit_start = self.parts.wrap("safety", self.safety.limit_start)  # type: ignore[method-assign]
        self.digest = hashlib.sha256()
        self.sequence = 0

    def _inputs(self, now_s: float) -> dict[str, float]:
        """The node's input callbacks (`_on_image`, `_on_joint_state`) on fresh messages."""
        from pi0_policy_ros.ros import convert

        stamp_s = now_s - INPUT_AGE_S
        frames = [_stamped(data, stamp_s) for data in self.frames]
        joints = _stamped(self.joints, stamp_s)
        t0 = time.perf_counter()
        for camera, data in zip(CAMERAS, frames):
            self.buffer.put_image(camera, data, convert.stamp_from_cdr(data), now_s)
        t1 = time.perf_counter()
        self.buffer.put_state(self.reader.positions(joints), convert.stamp_from_cdr(joints), now_s)
        t2 = time.perf_counter()
        return {"input_images": (t1 - t0) * 1e3, "input_joint_state": (t2 - t1) * 1e3}

    def tick(self, index: int) -> tuple[str, dict[str, float]]:
        """One control tick as `PolicyNode._control_step` runs it; (outcome, ms per part)."""
        from std_msgs.msg import Header

        from pi0_policy_ros.ros import convert

        now_s = T0_S + index / CONTROL_RATE_HZ
        timings = self._inputs(now_s)
        readings = iter(range(1 << 30))

        def clock() -> float:
            return now_s if next(readings) == 0 else now_s + ENGINE_S

        self.parts.ms.clear()
        t0 = time.perf_counter()
        result = self.step.run(clock)
        t1 = time.perf_counter()
        timings.update(self.parts.ms, step=(t1 - t0) * 1e3)
        if result.outcome != "publish":
            if result.outcome != "wait":
                raise RuntimeError(f"tick {index}: expected publish or wait, found {result.outcome}: {result.reason}")
            return "wait", timings
        chunk, plan = result.chunk, result.plan
        t2 = time.perf_counter()
        header = Header(stamp=convert.seconds_to_stamp(chunk.stamp_s), frame_id=str(self.sequence))
        t3 = time.perf_counter()
        chunk_msg = convert.action_chunk_message(chunk.actions)
        t4 = time.perf_counter()
        trajectory = convert.trajectory_message(plan, self.config.action_joint_names)
        t5 = time.perf_counter()
        self.stamp_pub.publish(header)
        t6 = time.perf_counter()
        self.chunk_pub.publish(chunk_msg)
        t7 = time.perf_counter()
        self.trajectory_pub.publish(trajectory)
        t8 = time.perf_counter()
        self.sequence += 1
        for msg in (header, chunk_msg, trajectory):
            self.digest.update(_canonical(msg))
        policy = chunk.timings_ms
        timings.update(
            # The step's decode time less its snapshot: wall time, whether the cameras decode one after
            # another or in parallel (a timer summed per decoder would count parallel ones twice).
            decode=result.timings_ms["decode"] - timings.get("snapshot", 0.0),
            resize_etc=policy["preprocess"], postprocess=policy["postprocess"],
            plan=result.timings_ms["plan"] - timings.get("safety", 0.0),
            build_header=(t3 - t2) * 1e3, build_chunk=(t4 - t3) * 1e3, build_trajectory=(t5 - t4) * 1e3,
            build=(t5 - t2) * 1e3, publish_header=(t6 - t5) * 1e3, publish_chunk=(t7 - t6) * 1e3,
            publish_trajectory=(t8 - t7) * 1e3, publish=(t8 - t5) * 1e3, tick=(t1 - t0 + t8 - t2) * 1e3)
        return "publish", timings

    def close(self) -> None:
        close_step = getattr(self.step, "close", None)  # absent from a step from before (--compare)
        if close_step is not None:
            close_step()
        self.policy.close()


def measure(ticks: int, tokenizer_path: Path, cases: list[str]) -> dict[str, Any]:
    """Every case matching `cases` (fnmatch patterns) once: raw samples (ms) per part, for publishing
    ticks and waiting ones."""
    import rclpy

    import pi0_policy_ros

    rclpy.init()
    node = rclpy.create_node("tick_overhead_bench")
    out: dict[str, Any] = {"package": str(Path(pi0_policy_ros.__file__).parent)}
    try:
        for kind in IMAGE_KINDS:
            for resize in RESIZES:
                for mode in MODES:
                    if not any(fnmatch.fnmatch(f"{kind}/{resize}/{mode}", pattern) for pattern in cases):
                        continue
                    case = Case(kind, resize, mode, node, tokenizer_path)
                    samples: dict[str, dict[str, list[float]]] = {"publish": defaultdict(list), "wait": defaultdict(list)}
                    index = 0
                    while len(samples["publish"]["tick"]) < ticks:
                        outcome, timings = case.tick(index)
                        if index >= WARMUP_TICKS:
                            for name, value in timings.items():
                                samples[outcome][name].append(value)
                        index += 1
                    case.close()
                    out[f"{kind}/{resize}/{mode}"] = {"samples": {k: dict(v) for k, v in samples.items()},
                                                      "messages_sha256": case.digest.hexdigest()}
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples pooled over rounds -> median / p99 per part."""
    summary: dict[str, Any] = {}
    for case in [name for name in rounds[0] if name != "package"]:
        pooled: dict[str, dict[str, list[float]]] = {"publish": defaultdict(list), "wait": defaultdict(list)}
        for measured in rounds:
            for outcome, parts in measured[case]["samples"].items():
                for name, values in parts.items():
                    pooled[outcome][name].extend(values)
        digests = {measured[case]["messages_sha256"] for measured in rounds}
        summary[case] = {"ms": {name: _stats(v) for name, v in pooled["publish"].items()},
                         "wait_ms": {name: _stats(v) for name, v in pooled["wait"].items()},
                         "messages_sha256": digests.pop() if len(digests) == 1 else sorted(digests)}
    return summary


def _git_commit(root: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def machine() -> dict[str, Any]:
    import cv2
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"host": platform.node(), "cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "opencv": cv2.__version__, "torch": torch.__version__, "rmw": os.environ.get("RMW_IMPLEMENTATION", "default"),
            "ros_distro": os.environ.get("ROS_DISTRO", ""), "device": "cpu (no GPU used)",
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def _child(root: Path, ticks: int, tokenizer_path: Path, cases: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as raw:
        env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run([sys.executable, __file__, "--raw", raw.name, "--ticks", str(ticks),
                        "--tokenizer", str(tokenizer_path), "--cases", *cases], env=env, check=True)
        return json.loads(Path(raw.name).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="the summary (median / p99 in ms per part and case)")
    parser.add_argument("--ticks", type=int, default=200, help="publishing ticks per case and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=["*"],
                        help="fnmatch patterns of <raw|jpeg>/<cpu|engine>/<mode> (default: all)")
    parser.add_argument("--compare", type=Path, help="the package root to measure as 'before', alternating")
    parser.add_argument("--raw", help=argparse.SUPPRESS)  # a child: raw samples of one round
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw:
        Path(args.raw).write_text(json.dumps(measure(args.ticks, args.tokenizer, args.cases)))
        return 0
    sys.path.insert(0, str(REPO))
    from pi0_policy_ros.jsonout import json_text, prepare_output_file
    from pi0_policy_ros.policy.tokenizer import train_tiny_tokenizer

    prepare_output_file(args.json)
    tokenizer_path = train_tiny_tokenizer(Path(tempfile.gettempdir()) / "pi0_tick_overhead_tokenizer.model")
    load_before = round(os.getloadavg()[0], 2)  # the machine's other jobs skew every number
    sides = {"before": args.compare.resolve(), "after": REPO} if args.compare else {"after": REPO}
    rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side, root in sides.items():  # alternating, so that a drift of the machine hits both
            rounds[side].append(_child(root, args.ticks, tokenizer_path, args.cases))
    document: dict[str, Any] = {
        "machine": {**machine(), "loadavg_1min_at_start": load_before}, "argv": sys.argv,
        "git": {side: _git_commit(root) if (root / ".git").exists() else str(root) for side, root in sides.items()},
        "geometry": {"cameras": len(CAMERAS), "frame_hw": list(FRAME_HW), "joints": 14, "horizon": 50,
                     "profile": "pi05_aloha", "control_rate_hz": CONTROL_RATE_HZ, "jpeg_quality": JPEG_QUALITY,
                     "params": str(PARAMS_FILE.relative_to(REPO))},
        "ticks_per_case": args.ticks * args.rounds, "rounds": args.rounds,
        "parts": {
            "input_images / input_joint_state": "the input callbacks for one frame per camera / one joint state "
                                                "(the poller thread, not the tick)",
            "snapshot": "ObservationBuffer.snapshot", "decode": "deserialize and decode, 3 cameras (wall time)",
            "resize_etc": "Policy preprocess: resize with pad (resize: cpu), normalize, tokenize, RTC guidance",
            "policy": "Policy.infer, engine stand-in included (~0)", "postprocess": "Policy postprocess",
            "safety": "SafetyFilter.apply + limit_start", "plan": "scheduler and trajectory plan (the step's "
                                                                  "plan time less safety)",
            "step": "ControlStep.run", "build": "the three messages", "publish": "rclpy publish of the three",
            "tick": "step + build + publish: the tick's thread, engine excluded"},
    }
    for side in sides:
        document[side] = summarize(rounds[side])
    text = json_text(document)
    if args.json:
        Path(args.json).write_text(text + "\n")
    shown = ("decode", "resize_etc", "snapshot", "safety", "plan", "build", "publish", "step", "tick")
    for side in sides:
        print(f"== {side}: median ms (p99)")
        for case, result in document[side].items():
            cells = " ".join(f"{p} {result['ms'][p]['median']:.3f}({result['ms'][p]['p99']:.2f})"
                             for p in shown if p in result["ms"])
            print(f"{case:28s} {cells}")
    if args.compare:
        same = all(document["before"][c]["messages_sha256"] == document["after"][c]["messages_sha256"]
                   for c in document["after"])
        print(f"messages identical before/after: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
