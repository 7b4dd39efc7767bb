"""Hookline's domain pieces shared by the pools: GitHub, storage, agent runtime."""
