"""MQTT control plane: commands in, status, events and metrics out."""
