"""Trainer callbacks of tl_plugin."""
