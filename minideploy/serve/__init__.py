"""Chapter 6's serving front ends: the OpenAI-compatible API server, a terminal client, a web UI.

Import the submodules directly: each needs the `serve` (or `webui`) extra.
"""
