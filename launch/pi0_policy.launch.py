"""Launch the pi0 / pi0.5 policy lifecycle node.

    ros2 launch pi0_policy_ros pi0_policy.launch.py params_file:=/path/to/robot.yaml namespace:=robot1

Remappings (edit them for your robot, or remap again from an including launch file):
- `~/joint_trajectory` -> `joint_trajectory_controller/joint_trajectory`: the command topic of
  ros2_controllers' joint_trajectory_controller (named after the controller).
`joint_states` and the camera topics (parameters, `camera_topics`) stay relative too: with
`namespace:=robot1` the node reads `/robot1/joint_states` and commands
`/robot1/joint_trajectory_controller/joint_trajectory`, as a ros2_control stack started in `/robot1`
has them, so two robots each with their own namespace do not share topics; with no namespace they
are `/joint_states` and `/joint_trajectory_controller/joint_trajectory`.

Before the node starts, `params_file` is read as rcl will read it for `<namespace>/pi0_policy`: a
path that is not a file, invalid YAML, a file with no block for that node, or a parameter name the
node does not declare in a block that names it, stops the launch with the reason. Otherwise the
node would start on its defaults (launch_ros only warns about a missing file, rcl silently skips
blocks for other node names, and rclpy ignores undeclared parameters) and run, or fail to
configure for another reason. A node key rcl refuses (`/robot*/pi0_policy`, `/robot-1/pi0_policy`:
it takes `*` and `**` only as whole tokens, and ROS names otherwise) stops it too: rcl refuses the
whole file, so the node would not start.

With autostart:=false the node waits unconfigured: drive it with
`ros2 lifecycle set <node> configure` / `activate`, or a lifecycle manager.
"""

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from pi0_policy_ros.ros.params import LAUNCH_REMAPPINGS, NODE_NAME, load_params_file

PACKAGE = "pi0_policy_ros"


def check_params_file(context: LaunchContext) -> list:
    """ConfigError (the launch stops) unless `params_file` gives parameters to this node."""
    namespace = LaunchConfiguration("namespace").perform(context)
    if not namespace.startswith("/"):  # relative: under the namespace an including launch file pushed
        namespace = f"{context.launch_configurations.get('ros_namespace') or ''}/{namespace}"
    load_params_file(LaunchConfiguration("params_file").perform(context), namespace, NODE_NAME)
    return []


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
        remappings=list(LAUNCH_REMAPPINGS),
        arguments=["--ros-args", "--log-level", log_level],
    )
    # Line-buffered log output, so that each line reaches the screen as it is written.
    return LaunchDescription([*arguments, OpaqueFunction(function=check_params_file),
                              SetEnvironmentVariable("RCUTILS_LOGGING_BUFFERED_STREAM", "1"), node])
