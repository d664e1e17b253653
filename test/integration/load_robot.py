"""A robot that floods the node: 3 raw cameras and joint_states at high rates, in its own process.

    python -m test.integration.load_robot NAMESPACE SECONDS CAMERA_HZ JOINT_HZ

Publishes `cam_a|cam_b|cam_c/image_raw` (rgb8 64x48) at CAMERA_HZ each and `joint_states` (j0..j2)
at JOINT_HZ on an absolute schedule (no drift), stamped with the wall clock, for SECONDS; then
prints {"images": N, "joint_states": M} (messages sent) as JSON. Its own process, so that its
publishing does not compete with the node for the test process's GIL.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState

CAMERAS = ("cam_a", "cam_b", "cam_c")
JOINTS = ["j0", "j1", "j2"]


def main(argv: list[str]) -> int:
    namespace, seconds, camera_hz, joint_hz = argv[0], float(argv[1]), float(argv[2]), float(argv[3])
    rclpy.init()
    node = rclpy.create_node("load_robot", namespace=namespace)
    try:
        image_pubs = [node.create_publisher(Image, f"{c}/image_raw", qos_profile_sensor_data) for c in CAMERAS]
        joint_pub = node.create_publisher(JointState, "joint_states", qos_profile_sensor_data)
        pixels = (np.arange(48 * 64 * 3) % 251).astype(np.uint8).tobytes()
        image = Image(height=48, width=64, encoding="rgb8", step=64 * 3, data=pixels)
        joints = JointState(name=JOINTS, position=[0.1, -0.2, 0.3])
        time.sleep(1.0)  # discovery
        start = time.monotonic()
        next_image, next_joint = start, start
        sent_images = sent_joints = 0
        while (now := time.monotonic()) < start + seconds:
            stamp = node.get_clock().now().to_msg()
            if now >= next_joint:
                joints.header.stamp = stamp
                joint_pub.publish(joints)
                sent_joints += 1
                next_joint += 1.0 / joint_hz
            if now >= next_image:
                image.header.stamp = stamp
                for pub in image_pubs:
                    pub.publish(image)
                sent_images += len(image_pubs)
                next_image += 1.0 / camera_hz
            time.sleep(max(0.0, min(next_joint, next_image) - time.monotonic()))
        print(json.dumps({"images": sent_images, "joint_states": sent_joints}), flush=True)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
