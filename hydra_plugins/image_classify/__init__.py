"""Hydra plugins of this project (Hydra discovers plugins only under the `hydra_plugins` namespace)."""
