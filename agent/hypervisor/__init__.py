"""Hypervisor, console proxy and virtual router backends of the agent (interfaces and the simulator)."""
