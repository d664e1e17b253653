"""ament_python package definition for pi0_policy_ros."""

from glob import glob
import os

from setuptools import find_packages, setup

PACKAGE = "pi0_policy_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (os.path.join("share", PACKAGE, "launch"), glob("launch/*.launch.py")),
        (os.path.join("share", PACKAGE, "config"), glob("config/*.yaml")),
    ],
    python_requires=">=3.10",
    # rclpy and the message packages come from the robot's ROS install (package.xml), never from
    # pip, so that they cannot shadow it. torch is pinned in requirements.txt for CPU machines; a
    # GPU machine brings its own build.
    install_requires=[
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "rosbags>=0.10",
        "matplotlib>=3.7",
    ],
    zip_safe=True,
    maintainer="pi0_policy_ros maintainers",
    maintainer_email="maintainers@example.com",
    description="pi0 / pi0.5 vision-language-action policies as a ROS 2 lifecycle node",
    license="Apache-2.0",
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "pi0_policy_node = pi0_policy_ros.ros.node:main",
            "pi0-policy = pi0_policy_ros.cli:main",
        ],
    },
)
