#!/usr/bin/env bash
# Source on the GPU machine (Python 3.12, torch preinstalled, no package registry) to run the node
# there: installs the ROS 2 Jazzy community wheels carried in .whl/ and sets what their bootstrapper
# would set in a venv. Make .whl/ here first (cp312 builds of requirements-dev.txt's ros-jazzy pins
# and their ros-* dependencies; the machine has numpy, opencv, yaml, sentencepiece, safetensors):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl <ros-* pins> lark-parser==0.12.0
# (the ros-* dependency list: `pip download -r requirements-dev.txt` on Python 3.11, the ros_* names.)
# Then, in a `run` call with carry [".whl"]:  source bench/ros_device_env.sh && python3 -m pi0_policy_ros.cli demo ...
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/pfx .whl/*.whl || return 1
_site=/tmp/pfx/lib/python3.12/site-packages
mkdir -p /tmp/sc && echo "import site; site.addsitedir('$_site')" > /tmp/sc/sitecustomize.py  # runs the .pth files
export LD_LIBRARY_PATH=/tmp/pfx/lib:$(ls -d $_site/ros_*.libs | tr '\n' ':')$LD_LIBRARY_PATH
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1 AMENT_PREFIX_PATH=/tmp/pfx PYTHONPATH=/tmp/sc:$PWD PYTHONUNBUFFERED=1
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-17}
