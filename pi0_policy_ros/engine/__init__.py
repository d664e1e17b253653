"""engine layer of pi0_policy_ros (see ARCHITECTURE.md)."""
