"""Launch the pi0 / pi0.5 policy lifecycle node.

    ros2 launch pi0_policy_ros pi0_policy.launch.py params_file:=/path/to/robot.yaml namespace:=robot1

Remappings (edit them for your robot, or remap again from an including launch file):
- `joint_states` -> `/joint_states`: joint_state_broadcaster publishes at the root, so the
  namespaced node still reads it there.
- `~/joint_trajectory` -> `/joint_trajectory_controller/joint_trajectory`: the command topic of
  ros2_controllers' joint_trajectory_controller (named after the controller).
Camera topics are parameters (`camera_topics`), relative to the namespace.

With autostart:=false the node waits unconfigured: drive it with
`ros2 lifecycle set <node> configure` / `activate`, or a lifecycle manager.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "pi0_policy_ros"
REMAPPINGS = [
    ("joint_states", "/joint_states"),
    ("~/joint_trajectory", "/joint_trajectory_controller/joint_trajectory"),
]


def generate_launch_description() -> LaunchDescription:
    params_file = LaunchConfiguration("params_file")
    namespace = LaunchConfiguration("namespace")
    use_sim_time = LaunchConfiguration("use_sim_time")
    log_level = LaunchConfiguration("log_level")
    autostart = LaunchConfiguration("autostart")

    arguments = [
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "pi05_libero.yaml"]),
            description="ROS parameter file of the node (see config/*.yaml)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its topics"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use the /clock topic (simulation) instead of the wall clock"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="log level: debug, info, warn, error or fatal"),
        DeclareLaunchArgument("autostart", default_value="false",
                              description="configure and activate the node on start-up"),
    ]
    node = LifecycleNode(
        package=PACKAGE,
        executable="pi0_policy_node",
        name="pi0_policy",
        namespace=namespace,
        output="screen",
        parameters=[
            params_file,
            {"use_sim_time": ParameterValue(use_sim_time, value_type=bool),
             "autostart": ParameterValue(autostart, value_type=bool)},
        ],
        remappings=REMAPPINGS,
        arguments=["--ros-args", "--log-level", log_level],
    )
    # Line-buffered log output, so that each line reaches the screen as it is written.
    return LaunchDescription([*arguments, SetEnvironmentVariable("RCUTILS_LOGGING_BUFFERED_STREAM", "1"), node])
