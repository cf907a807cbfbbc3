"""The IR: ModelSpec, Layout, canonical tensor names, lazy expressions, the Checkpoint container."""
