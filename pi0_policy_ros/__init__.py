"""pi0 / pi0.5 vision-language-action policies on ROS 2."""

__version__ = "0.1.0"
