"""Hermetic ROS settings for every test process: a per-process domain, discovery on localhost only.

Set before anything imports rclpy, so that integration tests in parallel jobs never see each other.
"""

import os

os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
