"""Devices: the synchronous, kernel-facing side (real VFIO devices and the simulated device)."""
